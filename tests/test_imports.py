"""Only `kdsearch.search` and the CLI import Ray; the tables are torch-free; each part of the
package imports only the parts below it (space < models < train < results < search < cli)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "kdsearch"
LAYERS = {
    "errors": 0,
    "atomic": 0,
    "storage": 0,
    "space": 1,
    "models": 2,
    "train": 3,
    "results": 4,
    "search": 5,
    "cli": 6,
    "__init__": 6,
}


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_import_kdsearch_does_not_import_ray_or_torch() -> None:
    mods = modules_after("import kdsearch")
    assert "ray" not in mods
    assert "torch" not in mods


def test_everything_but_the_search_runs_without_ray() -> None:
    plain = [f"kdsearch.{p.parent.name}.{p.stem}" for p in PACKAGE.glob("*/*.py") if p.parent.name != "search"]
    mods = modules_after("import kdsearch.cli, kdsearch.search.early_stopping, " + ", ".join(plain))
    assert "ray" not in mods


def test_the_space_and_the_tables_are_torch_free() -> None:
    """The space file, the objectives/datasets/samplers tables, outcomes and the front load
    without torch or optuna (a sampler imports optuna only when it is made)."""
    space = [f"kdsearch.space.{p.stem}" for p in (PACKAGE / "space").glob("*.py") if p.stem != "__init__"]
    mods = modules_after("import " + ", ".join(space + ["kdsearch.results.outcomes", "kdsearch.results.pareto"]))
    assert "torch" not in mods and "optuna" not in mods and "ray" not in mods


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdsearch"):
            out += [node.module] if node.module != "kdsearch" else [f"kdsearch.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("kdsearch")]
    return out


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[part]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_parts_import_only_parts_below(path: Path) -> None:
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for module in _imports(path):
        if module == "kdsearch" or module.split(".")[1] == "__version__":
            continue
        assert _layer(module) <= LAYERS[here], f"{path.relative_to(PACKAGE)} imports {module}, a part above it"


def test_lazy_exports_resolve() -> None:
    import kdsearch

    for name in kdsearch.__all__:
        assert getattr(kdsearch, name) is not None
