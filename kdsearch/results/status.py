"""What a run looks like now: counts, the front so far and its hypervolume, elapsed and expected time.

Drawn live by the search (kdsearch.search.callbacks.LiveView) and from the files by `kdsearch status`.
The front's columns come from `front_records` and are shown as the objectives table says.
A run that has ended (`run_end`) shows its duration, from its start to its recorded end; a run
that goes on shows the time since its start.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kdsearch.results.hypervolume import Hypervolume, hypervolume_of
from kdsearch.results.outcomes import counts
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import front_records
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Pairs


def status_dict(
    trials: Sequence[dict[str, Any]],
    epochs: Sequence[dict[str, Any]],
    objectives: Pairs,
    total: int,
    started: float,
    running: int | None = None,
    now: float | None = None,
    reference: Mapping[str, float] | None = None,
    why_no_reference: str = "",
    ended: float | None = None,
) -> dict[str, Any]:
    """The numbers behind the status view, JSON-ready (`kdsearch status --json`).

    Args:
        trials: trials.parquet's rows.
        epochs: epochs.parquet's rows.
        objectives: The run's objectives, (name, "min" or "max") each.
        total: The trials the run is to have (run.json's `trials`).
        started: When the run started, in seconds since the epoch (run.json's `started`).
        running: How many trials run now; None counts those with epochs and no final row.
        now: The time to measure elapsed time to [default: now].
        reference: The run's hypervolume reference point
            (kdsearch.results.hypervolume.run_reference); the hypervolume is absent without one.
        why_no_reference: Why there is no reference point, said where the hypervolume would be.
        ended: When the search last ended (run.json's `ended`), if it has; see `run_end`.

    Returns:
        The throughput, total, finished and running trials, the count of each status, elapsed
        and expected remaining seconds, `ended_at` (the run's end, None while it goes on), the
        objectives, the front so far and its hypervolume. Elapsed is the run's duration once it
        has ended, else the time from its start to `now`.
    """
    now = now or time.time()
    c = counts([r["status"] for r in trials])
    finished = sum(c.values())
    if running is None:  # from the files: trials with epochs but no final row yet
        done_ids = {r["trial_id"] for r in trials}
        running = len({e["trial_id"] for e in epochs} - done_ids)
    # a recorded end is the end (a run stopped by Ctrl-C leaves trials with epochs and no final row)
    end = run_end(trials, total, ended) if running == 0 or ended is not None else None
    elapsed = (end if end is not None else now) - started
    eta = elapsed / finished * (total - finished) if end is None and finished and finished < total else 0.0
    return {
        "throughput": throughput(epochs),
        "total": total,
        "finished": finished,
        "running": running,
        **c,
        "elapsed_seconds": elapsed,
        "ended_at": end,
        "expected_remaining_seconds": eta,
        "objectives": [list(o) for o in objectives],
        "front": front_records(front_rows(trials, objectives), objectives, recipe=False),
        "hypervolume": hypervolume_of(
            trials, objectives, reference or {}, started, why_no_reference or "no reference point given", history=False
        ).as_json(),
    }


def run_end(trials: Sequence[dict[str, Any]], total: int, ended: float | None = None) -> float | None:
    """When a run that runs no trial now ended, in seconds since the epoch; None while it goes on.

    Args:
        trials: trials.parquet's rows (each with the `finished_at` its recorder wrote).
        total: The trials the run is to have.
        ended: run.json's `ended`: the search writes it when its experiment returns (all trials
            done, or stopped by Ctrl-C) and drops it when the run is resumed or extended.

    Returns:
        `ended` when recorded; for a run without it (written before it was recorded) that has
        all its trials, the last trial's `finished_at`; else None.
    """
    if ended is not None:
        return float(ended)
    times = [float(t) for r in trials if (t := r.get("finished_at")) is not None and math.isfinite(float(t))]
    return max(times) if times and len(trials) >= total else None


# short headings for config columns, so a front with its recipe fits a terminal
HEADINGS = {
    "trial_id": "trial", "embed_dim": "D", "num_heads": "heads", "mlp_ratio": "mlp", "patch_size": "patch",
    "pos_embed": "pos", "distill_token": "dist", "temperature": "T", "hard_weight": "hard",
    "feature_weight": "feat", "attention_weight": "attn",
}  # fmt: skip


def render_front(records: Sequence[dict[str, Any]], title: str) -> Table:
    """A rich table of `front_records`: objectives and costs as the objectives table shows them."""
    columns = list(records[0]) if records else ["trial_id"]
    headings = [
        objective_table.get(c).heading if c in objective_table.OBJECTIVES else HEADINGS.get(c, c) for c in columns
    ]
    table = Table(*headings, title=title)
    for r in records:
        table.add_row(*(_cell(c, r[c]) for c in columns))
    return table


def _cell(column: str, value: Any) -> str:
    if column in objective_table.OBJECTIVES:
        return objective_table.get(column).show(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def throughput(epochs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Medians over each trial's latest epoch: images/s, the share of time waiting for data,
    model FLOPs utilization; the largest peak device memory. Empty before any epoch."""
    latest: dict[str, dict[str, Any]] = {}
    for e in epochs:
        if e["trial_id"] not in latest or e["epoch"] > latest[e["trial_id"]]["epoch"]:
            latest[e["trial_id"]] = e
    if not latest:
        return {}

    def values(key: str) -> list[float]:
        return [float(v) for r in latest.values() if (v := r.get(key)) is not None and not math.isnan(float(v))]

    out = {k: statistics.median(v) for k in ("images_per_second", "data_wait_share", "mfu") if (v := values(k))}
    if peaks := values("peak_memory"):
        out["peak_memory"] = max(peaks)
    return out


def render_status(
    trials: Sequence[dict[str, Any]],
    epochs: Sequence[dict[str, Any]],
    objectives: Pairs,
    total: int,
    started: float,
    running: int | None = None,
    reference: Mapping[str, float] | None = None,
    why_no_reference: str = "",
    ended: float | None = None,
) -> Group:
    """`status_dict` (same arguments) for a terminal: a headline of counts and times, then
    the front so far with its hypervolume, throughput and memory."""
    s = status_dict(trials, epochs, objectives, total, started, running, None, reference, why_no_reference, ended)
    took = "took" if s["ended_at"] is not None else "elapsed"
    head = Text.assemble(
        (f"{s['finished']}/{s['total']} trials", "bold"),
        f"  completed {s['completed']}  stopped early {s['stopped_early']}  infeasible {s['infeasible']}"
        f"  failed {s['failed']}  running {s['running']}   {took} {_hms(s['elapsed_seconds'])}",
        f"  expected {_hms(s['expected_remaining_seconds'])} more" if s["expected_remaining_seconds"] else "",
    )
    t = s["throughput"]
    parts = [f"{t['images_per_second']:,.0f} images/s"] if "images_per_second" in t else []
    if "data_wait_share" in t:
        parts.append(f"waiting for data {t['data_wait_share']:.0%}")
    if "mfu" in t:
        parts.append(f"MFU {t['mfu']:.1%}")
    if "peak_memory" in t:
        parts.append(f"peak memory {t['peak_memory'] / 2**30:.2f} GiB")
    lines = [head] + ([Text("throughput (latest epoch of each trial, median): " + ", ".join(parts))] if parts else [])
    lines.append(Text(Hypervolume.from_json(s["hypervolume"]).describe()))
    return Group(*lines, render_front(s["front"], "front so far"))


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
