"""Every malformed space file gives one clear line naming the file and key, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli

CORPUS = Path(__file__).parent / "malformed_spaces"
FILES = sorted(CORPUS.glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough() -> None:
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_malformed_space_gives_one_clear_line(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["space", "show", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"kdsearch: error: {path}: ")
    assert expected(path) in lines[0]


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["space", "show", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"kdsearch: error: {tmp_path / 'nope.yaml'}: no such file"


def test_console_script_prints_one_line_and_exits_2() -> None:
    """The installed `kdsearch` command, in its own process: no traceback reaches the user."""
    exe = Path(sys.executable).with_name("kdsearch")
    path = CORPUS / "embed_dim_not_divisible.yaml"
    proc = subprocess.run(
        [str(exe), "space", "show", str(path)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert expected(path) in proc.stderr


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["space", "show"]) == 2
