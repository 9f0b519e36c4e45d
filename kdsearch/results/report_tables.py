"""Rows of dicts as the report's tables: one HTML table and one Markdown table, and the one
way a cell is written (floats to 4 significant digits, NaN and None as empty)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any


def cell(v: Any) -> str:
    """One value as the tables show it: a float to 4 significant digits; NaN and None empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    """An HTML table whose header is the first row's keys ("none" when there are no rows)."""
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_md(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table whose header is the first row's keys ("none" when there are no rows)."""
    if not rows:
        return "none\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)).replace("|", "/") for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
