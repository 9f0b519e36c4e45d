"""The house's rules a reader relies on, checked on every file: modules small enough to read
whole, functions short enough to read at once, private names kept private, and the map
(ARCHITECTURE.md) naming every module there is and none that is not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "kdsearch"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def long_modules(paths: list[Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{shown(p)}: {n} lines" for p in paths if (n := len(p.read_text().splitlines())) > limit]


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`name: N lines` for each function (methods and nested ones included) over `limit` lines,
    decorators and docstring included."""
    return [
        f"{node.name}: {n} lines"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1) > limit
    ]


def private_imports(source: str) -> list[str]:
    """`module.name` for each `_name` (dunders aside) imported from another kdsearch module.

    NOTE: third parties' internals are left to review, not to this rule: a test may reach one
    where it pins that party's behaviour and no public call does (test_cluster_files: what
    `ray up` does to an AWS config's IAM profiles, without calling AWS), and the package reaches
    four, each pinned by a test: Ray's token-auth check and constants (search/ray_session.py,
    tests/test_token_probe.py), Optuna's WFG hypervolume (results/pareto.py, tests/test_pareto.py)
    and NSGA-II's generation key (search/warm_start.py, tests/test_steering.py)."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("kdsearch", "tests", "benchmarks")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_module_is_over_its_limit() -> None:
    assert long_modules(sorted(PACKAGE.rglob("*.py"))) == []


def test_no_function_is_over_its_limit() -> None:
    found = [f"{p.relative_to(ROOT)} {f}" for p in sorted(PACKAGE.rglob("*.py")) for f in long_functions(p.read_text())]
    assert found == []


def test_no_private_name_is_imported_from_another_module() -> None:
    found = [f"{p.relative_to(ROOT)}: {name}" for p in SOURCES for name in private_imports(p.read_text())]
    assert found == []


def test_the_rules_catch_what_they_name(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"@decorated\ndef f():\n{body}\n") == [f"f: {MAX_FUNCTION_LINES + 2} lines"]
    assert long_functions(f"def f():\n{body[: body.rindex(chr(10))]}\n") == []
    assert private_imports(
        "from kdsearch.search.run import _init_ray, run_search\nfrom kdsearch import __version__"
    ) == ["kdsearch.search.run._init_ray"]
    big, small = tmp_path / "big.py", tmp_path / "small.py"
    big.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    small.write_text("x = 1\n" * MAX_MODULE_LINES)
    assert long_modules([big, small]) == [f"{big}: {MAX_MODULE_LINES + 1} lines"]


def mapped_paths(text: str) -> set[str]:
    """Every `path/module.py` or `module.py` ARCHITECTURE.md names in backticks, as a path
    under kdsearch/ (a bare file name is looked up in the folder the same line names)."""
    names = set()
    for line in text.splitlines():
        folders = re.findall(r"`(\w+)/`", line)
        for ref in re.findall(r"`((?:\w+/)?\w+\.py)`", line):
            if "/" in ref or not folders:
                names.add(ref)
            else:
                names.add(f"{folders[0]}/{ref}")
    return names


def test_the_map_names_every_module_and_only_modules_there_are() -> None:
    named = mapped_paths((ROOT / "ARCHITECTURE.md").read_text())
    package = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    }
    package = {p for p in package if not p.endswith("__init__.py")}
    assert sorted(package - named) == [], "modules ARCHITECTURE.md does not name"
    assert sorted(n for n in named - package if not (PACKAGE / n).exists() and not (ROOT / n).exists()) == [], (
        "names of no file"
    )
