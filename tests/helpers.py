"""Small helpers shared by tests."""

from __future__ import annotations

from kdsearch.cli import main


def run_cli(args: list[str]) -> int:
    """Run the `kdsearch` command in this process, as the console script does; return its exit code."""
    try:
        main(args)
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0
