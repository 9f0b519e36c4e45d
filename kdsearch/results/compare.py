"""Runs side by side (`kdsearch compare`): each run's front, its hypervolume against one shared
reference point, and per positional encoding each run's best member; a table, a PNG and a
self-contained HTML page.

The shared reference: the runs must have the same objectives (as pairs of name and direction,
in any order); the reference is the one stated (`--reference val_acc=0,flops=2e7`) or else,
per objective, the worst of the runs' own references (run.json's, else their space's:
kdsearch.results.hypervolume.run_reference), so each run's own box lies inside it. Each run's
value is `hypervolume_of` (the normalization `pareto` uses) against that point: with a run's
own reference it is exactly `pareto`'s figure.

An encoding's best member in a run: its most accurate completed trial with that encoding (the
first maximized objective), ties to the cheaper (the first minimized objective), then to the
smaller trial id. It is the top of that encoding's own front (kdsearch.results.report.pe_fronts).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdsearch.atomic import write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.results.hypervolume import hypervolume_of, run_reference
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.plots import TAB10, Chart, Series, save_png, to_plotly
from kdsearch.results.report_tables import table_html
from kdsearch.results.tables import Run
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Pairs, accuracy_and_cost
from kdsearch.space.specs import POS_EMBEDS


def _pairs(objectives: Pairs) -> str:
    return ", ".join(f"{name} ({mode})" for name, mode in objectives)


def shared_objectives(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """The objectives every run has (the first run's order); one line naming the first
    difference otherwise."""
    first = [tuple(o) for o in runs[0].objectives]
    for r in runs[1:]:
        if set(map(tuple, r.objectives)) != set(first):
            raise KdsearchError(
                f"{r.paths.uri}: its objectives {_pairs(r.objectives)} differ from {runs[0].paths.uri}'s "
                f"{_pairs(first)}; compare runs judged by the same objectives"
            )
    return first


def parse_reference(text: str, objectives: Pairs) -> dict[str, float]:
    """`--reference val_acc=0,flops=2e7` -> {objective: value}; every objective named once.

    Args:
        text: Comma-separated NAME=VALUE pairs, raw units (FLOPs, not MFLOPs).
        objectives: The runs' objectives; each must be given, no other.

    Returns:
        The reference point, per objective.
    """
    names = [name for name, _ in objectives]
    out: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in names:
            raise KdsearchError(
                f"--reference: {item!r} is not NAME=VALUE for one of the runs' objectives ({', '.join(names)})"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise KdsearchError(f"--reference: {name}={value!r} is not a number") from None
        if not math.isfinite(out[name]):
            raise KdsearchError(f"--reference: {name}={value!r} must be a finite number")
    lacking = [n for n in names if n not in out]
    if lacking:
        raise KdsearchError(
            f"--reference: no value for {', '.join(lacking)}; give every objective, e.g. "
            + ",".join(f"{n}=VALUE" for n in names)
        )
    return out


def shared_reference(runs: Sequence[Run], objectives: Pairs) -> dict[str, float]:
    """Per objective the worst of the runs' own references (the smallest for a maximized one,
    the largest for a minimized one); one line when a run has none for an objective."""
    out: dict[str, float] = {}
    for r in runs:
        own, why = run_reference(r.paths, r.meta, objectives)
        lacking = [name for name, _ in objectives if name not in own]
        if lacking:
            raise KdsearchError(
                f"{r.paths.uri}: {why or 'no reference point for ' + ', '.join(lacking)}; "
                "or state one with --reference NAME=VALUE,..."
            )
        for name, mode in objectives:
            worse = min if mode == "max" else max
            out[name] = worse(out[name], own[name]) if name in out else own[name]
    return out


def best_by_encoding(trials: Sequence[dict[str, Any]], objectives: Pairs) -> dict[str, dict[str, Any]]:
    """Each positional encoding's best completed trial (the module's rule), table order."""
    acc, cost = accuracy_and_cost(objectives)
    out = {}
    for pe in POS_EMBEDS:
        done = [
            r
            for r in trials
            if r.get("student.pos_embed") == pe
            and r.get("status") == Status.COMPLETED
            and r.get(acc) is not None
            and r.get(cost) is not None
            and not math.isnan(r[acc])
        ]
        if done:
            out[pe] = min(done, key=lambda r: (-r[acc], r[cost], r["trial_id"]))
    return out


def _labels(runs: Sequence[Run]) -> list[str]:
    """Each run's name, or its location where two runs share a name."""
    names = [r.name for r in runs]
    return [r.name if names.count(r.name) == 1 else r.paths.uri for r in runs]


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def compare_runs(runs: Sequence[Run], reference: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The comparison as plain (strict) JSON data.

    Args:
        runs: One run or more, judged by the same objectives.
        reference: The shared reference point (raw units); None: the worst of the runs' own.

    Returns:
        {"objectives", "accuracy", "cost", "reference", "ideal", "reference_from", "runs": [{"run", "uri",
        "trials", "completed", "front_size", "front", "hypervolume", "why_no_hypervolume",
        "best_by_encoding": {encoding: {"trial_id", ACC, COST}}}]}.
    """
    objectives = shared_objectives(runs)
    ref = dict(reference) if reference is not None else shared_reference(runs, objectives)
    acc, cost = accuracy_and_cost(objectives)
    out = []
    for label, r in zip(_labels(runs), runs):
        hv = hypervolume_of(r.trials, objectives, ref, history=False)
        front = front_rows(r.trials, objectives)
        best = best_by_encoding(r.trials, objectives)
        out.append(
            {
                "run": label,
                "uri": r.paths.uri,
                "trials": len(r.trials),
                "completed": sum(t.get("status") == Status.COMPLETED for t in r.trials),
                "front_size": len(front),
                "front": [t["trial_id"] for t in front],
                "hypervolume": _plain(hv.value),
                "why_no_hypervolume": hv.why_not or None,
                "best_by_encoding": {
                    pe: {"trial_id": t["trial_id"], acc: _plain(t[acc]), cost: _plain(t[cost])}
                    for pe, t in best.items()
                },
            }
        )
    return {
        "objectives": [list(o) for o in objectives],
        "accuracy": acc,
        "cost": cost,
        "reference": ref,
        "ideal": {name: objective_table.get(name).ideal_value(mode) for name, mode in objectives},
        "reference_from": "stated" if reference is not None else "the worst of the runs' own",
        "runs": out,
    }


def summary_rows(comparison: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per run: its name, trials completed of recorded, front size, hypervolume."""
    return [
        {
            "run": r["run"],
            "completed": r["completed"],
            "trials": r["trials"],
            "front_size": r["front_size"],
            "hypervolume": r["hypervolume"],
        }
        for r in comparison["runs"]
    ]


def encoding_rows(comparison: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per encoding and run that trained it: that run's best member of the encoding."""
    acc, cost = comparison["accuracy"], comparison["cost"]
    return [
        {"pos_embed": pe, "run": r["run"], "trial_id": b["trial_id"], acc: b[acc], cost: b[cost]}
        for pe in POS_EMBEDS
        for r in comparison["runs"]
        if (b := r["best_by_encoding"].get(pe))
    ]


def flat_rows(comparison: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CSV: one row per run and encoding, the run's summary repeated on each (a run that
    trained no encoding: one row with the encoding's columns empty)."""
    acc, cost = comparison["accuracy"], comparison["cost"]
    empty = {"pos_embed": None, "trial_id": None, acc: None, cost: None}
    out = []
    for summary, r in zip(summary_rows(comparison), comparison["runs"]):
        best = [{"pos_embed": pe, **b} for pe, b in r["best_by_encoding"].items()] or [empty]
        out += [{**summary, **{k: b.get(k) for k in empty}} for b in best]
    return out


def compare_chart(runs: Sequence[Run], objectives: Pairs, labels: Sequence[str] | None = None) -> Chart:
    """Every run's completed trials (faint) and its front (a step line with its members), a
    colour per run, against the first minimized and maximized objectives."""
    acc, cost = accuracy_and_cost(objectives)
    xo, yo = objective_table.get(cost), objective_table.get(acc)
    chart = Chart(f"{acc} against {cost}: the fronts of {len(runs)} runs", xo.axis_label(), yo.axis_label())
    for i, (label, r) in enumerate(zip(labels or _labels(runs), runs)):
        color = TAB10[i % len(TAB10)]
        done = [t for t in r.trials if t.get("status") == Status.COMPLETED and t.get(acc) is not None]
        front = front_rows(r.trials, objectives)
        for name, rows, kind, opacity in ((f"{label}: trials", done, "points", 0.35), (label, front, "steps", 1.0)):
            hover = [
                f"run: {label}<br>trial_id: {t['trial_id']}<br>pos_embed: {t.get('student.pos_embed')}"
                f"<br>{acc}: {t[acc]}<br>{cost}: {t[cost]}"
                for t in rows
            ]
            chart.series.append(
                Series(
                    name,
                    [t[cost] / xo.scale for t in rows],
                    [t[acc] / yo.scale for t in rows],
                    kind=kind,
                    marker="circle",
                    color=color,
                    opacity=opacity,
                    hover=hover,
                )
            )
    return chart


def write_compare_png(runs: Sequence[Run], comparison: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The fronts on one 800x560 PNG; returns its path."""
    objectives = [tuple(o) for o in comparison["objectives"]]
    return save_png(compare_chart(runs, objectives, [r["run"] for r in comparison["runs"]]), path)


def reference_line(comparison: Mapping[str, Any]) -> str:
    """What the hypervolumes are measured against, in one sentence."""

    def point(values: Mapping[str, Any]) -> str:
        shown = (
            f"{name} {value:.4g}".replace("e+0", "e").replace("e+", "e")
            for name, value in values.items()
            if value is not None
        )
        return ", ".join(shown)

    return (
        f"Hypervolume: the share of the box from the shared reference ({point(comparison['reference'])}; "
        f"{comparison['reference_from']}) to the ideal ({point(comparison['ideal'])}) that a run's completed "
        "trials dominate, in all the objectives."
    )


def write_compare_html(runs: Sequence[Run], comparison: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One self-contained page (plotly's script inlined): the runs' table, each encoding's best
    members, and the fronts on one interactive plot (a trial on hover); returns its path."""
    objectives = [tuple(o) for o in comparison["objectives"]]
    labels = [r["run"] for r in comparison["runs"]]
    fig = to_plotly(compare_chart(runs, objectives, labels))
    for i, trace in enumerate(fig.data):  # compare_chart's series: each run's trials, then its front
        trace.legendgroup = labels[i // 2]  # a run's two traces are one legend group: one click shows or hides both
    figure = fig.to_html(full_html=False, include_plotlyjs="inline", div_id="fronts")
    names = ", ".join(r["run"] for r in comparison["runs"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdsearch compare: {html.escape(names)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{background:#f3f3f3}}</style>
<script>window.kdsearchErrors=[];window.addEventListener("error",function(e){{window.kdsearchErrors.push(String(e.message));document.title="ERROR "+e.message;}});</script>
</head><body>
<h1>kdsearch compare: {html.escape(names)}</h1>
<p>Objectives: {html.escape(_pairs(objectives))}. {html.escape(reference_line(comparison))}</p>
<h2>Runs</h2>
{table_html(summary_rows(comparison))}
<h2>Each encoding's best member per run</h2>
<p>The most accurate completed trial of the encoding ({html.escape(comparison["accuracy"])}), ties to the cheaper.</p>
{table_html(encoding_rows(comparison))}
<h2>The fronts</h2>
{figure}
</body></html>
"""
    write_text_atomic(Path(path), page)
    return Path(path)
