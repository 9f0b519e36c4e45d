"""What every command writes with: consoles that keep tables wide in a file or pipe, the one
stderr console for progress and messages, and the output formats of the table commands."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any

from rich.console import Console


def wide_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when writing to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


err_console = wide_console(stderr=True)
"""Progress, notes and messages: stderr, so stdout holds only a command's result."""


class Format(str, Enum):
    """How `pareto`, `confirm` and `measure` print their rows."""

    table = "table"
    csv = "csv"
    json = "json"


def write_csv(rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    """Write `rows` to stdout as CSV with a header of `fieldnames`."""
    writer = csv.DictWriter(sys.stdout, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
