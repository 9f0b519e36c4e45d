"""A space file cannot run code: PyYAML's python tags are refused with one line and exit code 2
before anything is constructed, by `space show` and by `search` (before Ray starts)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import pytest
import ray

import kdsearch.search.run  # noqa: F401  (imported here, so the timing below is the refusal's alone)
from tests.helpers import run_cli

TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
    "!!python/name:os.system",
    "!!python/module:os",
]


def _space(tmp_path: Path, tag: str, where: str) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    value = tag.format(marker=marker)
    text = {
        "top": f"{value}\n",
        "value": f"student:\n  embed_dim: 32\n  depth: {value}\n",
        "key": f"student:\n  ? {value}\n  : 1\n",
    }[where]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path, marker


def _call(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("where", ["top", "value", "key"])
@pytest.mark.parametrize("tag", TAGS, ids=[t.split()[0].removeprefix("!!python/") for t in TAGS])
def test_space_show_refuses_python_tags(tmp_path: Path, tag: str, where: str) -> None:
    path, marker = _space(tmp_path, tag, where)
    code, err = _call(["space", "show", str(path)])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"kdsearch: error: {path}: line "), err
    assert "is not allowed; a space file holds plain YAML" in err
    assert not marker.exists()


@pytest.mark.parametrize("tag", TAGS[:3], ids=["apply", "new", "subprocess"])
def test_search_refuses_python_tags_before_ray(tmp_path: Path, tag: str) -> None:
    path, marker = _space(tmp_path, tag, "value")
    assert not ray.is_initialized()
    start = time.perf_counter()
    code, err = _call(["search", str(path), "--storage", str(tmp_path / "runs")])
    took = time.perf_counter() - start
    assert code == 2
    assert err.count("\n") == 1 and "is not allowed; a space file holds plain YAML" in err, err
    assert not marker.exists()
    assert not ray.is_initialized()
    assert took < 3, f"the refusal took {took:.1f} s"
    assert not (tmp_path / "runs").exists()  # nothing written: refused before the storage was opened
