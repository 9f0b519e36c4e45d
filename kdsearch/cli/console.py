"""What every command writes with: consoles that keep tables wide in a file or pipe, the one
stderr console for progress and messages, the output formats of the table commands, and the
one strict-JSON printer every `--json` / `--format json` output goes through."""

from __future__ import annotations

import csv
import json
import math
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


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-inf; numpy scalars and arrays included) made None.

    Args:
        obj: Plain data: dicts, lists, tuples, numbers, strings, numpy scalars or arrays.

    Returns:
        The same data with numpy values as Python ones and no NaN or infinity anywhere.
    """
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # numpy scalar or array
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def print_json(obj: Any, indent: int | None = None) -> None:
    """Print `obj` on stdout as strict JSON (RFC 8259): NaN and +-inf as null, so every JSON
    reader (JavaScript's JSON.parse included) reads it; anything else not JSON as its str.

    Args:
        obj: Plain data (see `strict_json`).
        indent: As json.dumps's [default: one line].
    """
    print(json.dumps(strict_json(obj), indent=indent, default=str, allow_nan=False))
