"""What a run looks like now: counts, the front so far, elapsed and expected time.

Drawn live by the search (kdsearch.search.LiveView) and from the files by `kdsearch status`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import numpy as np
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from kdsearch.pareto import non_dominated_mask

Objectives = Sequence[tuple[str, str]]  # (metric, "max" | "min")


def wide_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when writing to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def accuracy_and_cost(objectives: Objectives) -> tuple[str, str]:
    """The objective plotted up (the first maximized) and across (the first minimized)."""
    acc = next((m for m, mode in objectives if mode == "max"), "val_acc")
    cost = next((m for m, mode in objectives if mode == "min"), "flops")
    return acc, cost


def front_rows(trials: Sequence[dict[str, Any]], objectives: Objectives) -> list[dict[str, Any]]:
    """The completed trials no other completed trial dominates, cheapest first."""
    done = [r for r in trials if r.get("status") == "completed" and all(r.get(m) is not None for m, _ in objectives)]
    if not done:
        return []
    points = np.array([[float(r[m]) for m, _ in objectives] for r in done])
    mask = non_dominated_mask(points, [mode == "max" for _, mode in objectives])
    front = [r for r, keep in zip(done, mask) if keep]
    _, cost = accuracy_and_cost(objectives)
    return sorted(front, key=lambda r: (r[cost], r["trial_id"]))


def counts(trials: Sequence[dict[str, Any]]) -> dict[str, int]:
    out = {"completed": 0, "stopped_early": 0, "infeasible": 0, "failed": 0}
    for r in trials:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def status_dict(
    trials: Sequence[dict[str, Any]], epochs: Sequence[dict[str, Any]], objectives: Objectives,
    total: int, started: float, running: int | None = None, now: float | None = None,
) -> dict[str, Any]:
    """The numbers behind the view, JSON-ready."""
    now = now or time.time()
    c = counts(trials)
    finished = sum(c.values())
    if running is None:  # from the files: trials with epochs but no final row yet
        done_ids = {r["trial_id"] for r in trials}
        running = len({e["trial_id"] for e in epochs} - done_ids)
    elapsed = now - started
    eta = elapsed / finished * (total - finished) if finished and finished < total else 0.0
    front = front_rows(trials, objectives)
    return {
        "total": total, "finished": finished, "running": running, **c,
        "elapsed_seconds": elapsed, "expected_remaining_seconds": eta,
        "front": [
            {k: r.get(k) for k in ("trial_id", "val_acc", "flops", "params", "student.embed_dim", "student.depth",
                                   "student.num_heads", "student.patch_size", "student.pos_embed", "student.distill_token")}
            for r in front
        ],
    }


def render_status(
    trials: Sequence[dict[str, Any]], epochs: Sequence[dict[str, Any]], objectives: Objectives,
    total: int, started: float, running: int | None = None,
) -> Group:
    s = status_dict(trials, epochs, objectives, total, started, running)
    head = Text.assemble(
        (f"{s['finished']}/{s['total']} trials", "bold"),
        f"  completed {s['completed']}  stopped early {s['stopped_early']}  infeasible {s['infeasible']}"
        f"  failed {s['failed']}  running {s['running']}   elapsed {_hms(s['elapsed_seconds'])}",
        f"  expected {_hms(s['expected_remaining_seconds'])} more" if s["expected_remaining_seconds"] else "",
    )
    table = Table("trial", "val_acc", "MFLOPs", "params", "D", "depth", "heads", "patch", "pos_embed", "dist", title="front so far")
    for r in s["front"]:
        table.add_row(
            r["trial_id"], f"{r['val_acc']:.4f}", f"{r['flops'] / 1e6:.2f}", f"{r['params']:,}", str(r["student.embed_dim"]),
            str(r["student.depth"]), str(r["student.num_heads"]), str(r["student.patch_size"]), str(r["student.pos_embed"]),
            "yes" if r["student.distill_token"] else "no",
        )
    return Group(head, table)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
