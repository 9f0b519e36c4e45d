"""The package's import rules, checked on every import: statements at any level, and modules
named by string (`importlib.import_module("kdsearch...")`, a table's `"module:function"`).

Only `kdsearch.search` and the CLI import Ray; the tables are torch-free; each part of the
package imports only the parts below it (space < models < train < results < search < cli);
no two modules import each other, directly or around a cycle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
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
# a string that names a kdsearch module, alone or as "module:function"
MODULE_NAME = re.compile(r"kdsearch(\.\w+)+(:\w+)?")


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
    plain = [module_of(p) for p in PACKAGE.rglob("*.py") if "search" not in p.relative_to(PACKAGE).parts]
    mods = modules_after("import kdsearch.search.early_stopping, " + ", ".join(m for m in plain if m != "kdsearch"))
    assert "ray" not in mods


def test_the_space_and_the_tables_are_torch_free() -> None:
    """The space file, the objectives/datasets/samplers tables, outcomes and the front load
    without torch or optuna (a sampler imports optuna only when it is made)."""
    space = [f"kdsearch.space.{p.stem}" for p in (PACKAGE / "space").glob("*.py") if p.stem != "__init__"]
    mods = modules_after("import " + ", ".join(space + ["kdsearch.results.outcomes", "kdsearch.results.pareto"]))
    assert "torch" not in mods and "optuna" not in mods and "ray" not in mods


def module_of(path: Path) -> str:
    """`kdsearch/train/trial.py` -> `kdsearch.train.trial`; a package's `__init__.py` -> the package."""
    parts = ("kdsearch", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p) for p in PACKAGE.rglob("*.py")}


def imported_modules(source: str) -> list[str]:
    """The kdsearch modules a source imports: by statement (at any level) or by a string that
    names one (passed to `importlib.import_module`, or a `"module:function"` a table resolves
    later). Docstrings and messages that mention a module do not count: only a string that is
    a module's name and nothing else does.

    Args:
        source: Python source text.

    Returns:
        Module names, each `kdsearch` or `kdsearch.PART...` (a name imported from a package is
        taken as its submodule when it is one).
    """
    out = []
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdsearch":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "kdsearch"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if MODULE_NAME.fullmatch(node.value):
                out.append(node.value.partition(":")[0])
    return out


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[part]


def imports_above(path: Path, source: str) -> list[str]:
    """The kdsearch modules `source` (the file at `path`) imports from a part above its own."""
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return [m for m in imported_modules(source) if m != "kdsearch" and layer(m) > LAYERS[here]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_parts_import_only_parts_below(path: Path) -> None:
    assert imports_above(path, path.read_text()) == [], f"{path.relative_to(PACKAGE)} imports a part above it"


@pytest.mark.parametrize(
    ("line", "imported"),
    [
        ("import kdsearch.train.measure", "kdsearch.train.measure"),
        ("from kdsearch.train import measure", "kdsearch.train.measure"),
        ("def f():\n    from kdsearch.train.measure import measure_objective", "kdsearch.train.measure"),
        ("importlib.import_module('kdsearch.train.measure')", "kdsearch.train.measure"),
        ("LOADERS = {'digits': 'kdsearch.train.data:load_digits'}", "kdsearch.train.data"),
        ("Row('digits', loader='kdsearch.train.data:load_digits')", "kdsearch.train.data"),
    ],
)
def test_an_import_that_runs_back_up_is_caught_however_it_is_written(line: str, imported: str) -> None:
    source = f'"""A table that mentions kdsearch.train.measure in its docstring."""\n{line}\n'
    assert imports_above(PACKAGE / "space" / "objectives.py", source) == [imported]


def test_a_module_named_only_in_a_docstring_or_a_message_is_no_import() -> None:
    source = textwrap.dedent('''
        """Reads kdsearch.train.measure's figures."""
        def f():
            """kdsearch.train.data:load_digits"""
            raise ValueError(f"see kdsearch.train.measure for {f}")
    ''')
    assert imports_above(PACKAGE / "space" / "objectives.py", source) == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the kdsearch modules it imports (the package itself left out: it only
    forwards its public names, lazily)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_of(path)
        if name != "kdsearch":
            graph[name] = {
                m for m in imported_modules(path.read_text()) if m in MODULES and m not in ("kdsearch", name)
            }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_modules_import_each_other() -> None:
    assert cycles(import_graph()) == []


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_lazy_exports_resolve() -> None:
    import kdsearch

    for name in kdsearch.__all__:
        assert getattr(kdsearch, name) is not None
