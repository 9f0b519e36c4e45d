"""The report's "Study" section: each studied student's mean test accuracy against resolution,
zero-shot (dashed) and fine-tuned (solid), with 95% intervals as error bars; which encoding wins
at each resolution and mode and whether its lead is within noise; and wide against deep, the
run's accuracy against depth in bins of equal log cost (kdsearch.results.study has the numbers).

`study_section_html` and `study_section_markdown` are what kdsearch.results.report calls; both
return "" for a run with no study.parquet and fewer than 4 completed trials. The charts are
kdsearch.results.plots `Chart`s whose points are joined by lines (`LineChart`: a dash and point
labels per series), drawn with plotly for the page and matplotlib for the Markdown's PNGs.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.results.confirm import INTERVAL, INTERVAL_HEADING, NOISE_RULE, clipped, load_confirm
from kdsearch.results.outcomes import Status
from kdsearch.results.plots import COLORS, PNG_SIZE, TAB10, Chart, Series, to_plotly, write_png
from kdsearch.results.report_tables import table_html, table_md
from kdsearch.results.study import FINETUNED, ZERO_SHOT, load_study, resolution_winners, study_summary, wide_vs_deep
from kdsearch.results.tables import Run
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import accuracy_and_cost

HEADING = "Study: positional encodings across resolutions, and wide against deep at matched cost"
RESOLUTION_HEADING = (
    "Accuracy against resolution: each studied student's mean test accuracy, zero-shot (dashed) and fine-tuned (solid)"
)
WINNERS_HEADING = "Winners by resolution: the best encoding at each resolution and mode, and whether its lead is noise"
WIDE_HEADING = "Wide against deep: mean accuracy against depth, one line per bin of equal log cost"
RESOLUTION_PNG = "study_resolution.png"
WIDE_PNG = "study_wide_deep.png"
MIN_TRIALS = 4  # completed trials the wide-against-deep part needs
DASHES = {ZERO_SHOT: "dash", FINETUNED: "solid"}
MODE_NAMES = {ZERO_SHOT: "zero-shot", FINETUNED: "fine-tuned"}
_MPL_DASHES = {"dash": "--", "solid": "-"}


@dataclass
class LineChart:
    """A `Chart` whose points are joined in order: each series' dash ("solid" | "dash") and
    optional text labels beside its points."""

    chart: Chart
    dashes: list[str] = field(default_factory=list)
    labels: list[list[str] | None] = field(default_factory=list)


def line_figure_html(lines: LineChart, div_id: str) -> str:
    """The chart as a plotly figure's HTML without plotly's script (the page's first figure has it)."""
    fig = to_plotly(lines.chart)
    for trace, dash, labels in zip(fig.data, lines.dashes, lines.labels):
        trace.update(mode="lines+markers+text" if labels else "lines+markers", line={"dash": dash})
        trace.update(line_color=trace.marker.color)
        if labels:
            trace.update(text=labels, textposition="top center")
    ticks = sorted({x for s in lines.chart.series for x in s.x})
    fig.update_xaxes(tickvals=ticks)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def save_line_png(lines: LineChart, path: str | os.PathLike) -> Path:
    """The chart as an 800x560 px PNG (matplotlib; written, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100)
    for s, dash, labels in zip(lines.chart.series, lines.dashes, lines.labels):
        above = [math.nan if e is None else e for e in s.y_error or [None] * len(s.x)]
        below = [math.nan if e is None else e for e in s.y_error_minus] if s.y_error_minus else above
        ax.errorbar(
            s.x, s.y, yerr=[below, above], ls=_MPL_DASHES[dash], marker="o", color=s.color, capsize=3, label=s.name
        )
        for x, y, text in zip(s.x, s.y, labels or []):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(sorted({x for s in lines.chart.series for x in s.x}))
    ax.set(xlabel=lines.chart.x_label, ylabel=lines.chart.y_label, title=lines.chart.title)
    ax.grid(alpha=0.3)
    if lines.chart.series:
        ax.legend(fontsize=8, loc="best")
    return write_png(fig, path)


def _bars(entries: list[dict[str, Any]], mean: str, low: str, high: str) -> dict[str, list[float | None]]:
    return {
        "y_error": [None if e[low] is None else e[high] - e[mean] for e in entries],
        "y_error_minus": [None if e[low] is None else e[mean] - e[low] for e in entries],
    }


def resolution_chart(summary: list[dict[str, Any]]) -> LineChart:
    """Mean test accuracy against img_size: one line per studied student and mode, coloured by
    encoding, dashed zero-shot and solid fine-tuned, error bars the 95% intervals (`INTERVAL`)."""
    lines = LineChart(
        Chart(
            "mean test accuracy against resolution (95% t intervals over the seeds)",
            "input resolution (pixels, square; patch size kept)",
            "mean test accuracy (fraction right)",
        )
    )
    done = [s for s in summary if s["n"] >= 1]
    trials_of: dict[Any, set[str]] = {}
    for s in done:
        trials_of.setdefault(s["pos_embed"], set()).add(s["trial_id"])
    for key in dict.fromkeys((s["pos_embed"], s["trial_id"], s["mode"]) for s in done):
        pe, tid, mode = key
        points = sorted(
            (s for s in done if (s["pos_embed"], s["trial_id"], s["mode"]) == key), key=lambda s: s["img_size"]
        )
        who = f"{pe} {tid}" if len(trials_of[pe]) > 1 else str(pe)
        hover = [
            f"{who}, {MODE_NAMES.get(mode, mode)} at {s['img_size']} px (trained at {s['trained_img_size']} px)"
            f"<br>test acc: {_mean_interval(s)}<br>n: {s['n']}<br>flops: {s['flops']}"
            for s in points
        ]
        lines.chart.series.append(
            Series(
                f"{who} ({MODE_NAMES.get(mode, mode)})",
                [s["img_size"] for s in points],
                [s["test_acc_mean"] for s in points],
                color=COLORS.get(pe),
                hover=hover,
                **_bars(points, "test_acc_mean", "test_acc_low", "test_acc_high"),
            )
        )
        lines.dashes.append(DASHES.get(mode, "solid"))
        lines.labels.append(None)
    return lines


def wide_chart(wide: list[dict[str, Any]]) -> LineChart:
    """Mean accuracy against depth: one line per cost bin, error bars the 95% interval over its
    students, each point labelled with how many students it holds."""
    cost = wide[0]["cost"] if wide else "flops"
    lines = LineChart(
        Chart(
            f"wide against deep: mean accuracy against depth in bins of equal log {cost}",
            "depth (transformer blocks)",
            "mean accuracy of the bin's students at that depth (fraction right)",
        )
    )
    for b in dict.fromkeys(w["bin"] for w in wide):
        points = [w for w in wide if w["bin"] == b]
        name = f"{_cost_range(points[0])}"
        hover = [
            f"{name}<br>depth: {w['depth']}<br>n students: {w['n_students']}<br>mean embed_dim: {w['embed_dim_mean']:.1f}"
            f"<br>accuracy: {_interval(w['acc_mean'], w['acc_low'], w['acc_high'], w['n_students'])} ({w['metric']})"
            for w in points
        ]
        lines.chart.series.append(
            Series(
                name,
                [w["depth"] for w in points],
                [w["acc_mean"] for w in points],
                color=TAB10[b % len(TAB10)],
                hover=hover,
                **_bars(points, "acc_mean", "acc_low", "acc_high"),
            )
        )
        lines.dashes.append("solid")
        lines.labels.append([f"n={w['n_students']}" for w in points])
    return lines


def _cost_range(w: dict[str, Any]) -> str:
    o = objective_table.get(w["cost"])
    return f"{o.show(w['cost_low'])}-{o.show(w['cost_high'])} {o.heading}"


def _interval(mean: float | None, low: float | None, high: float | None, n: int) -> str:
    if mean is None:
        return "no completed seed"
    if low is None:
        return f"{mean:.4f} (n = {n}: no interval)"
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]" + (" clipped" if clipped(low, high) else "")


def _mean_interval(s: dict[str, Any]) -> str:
    return _interval(s["test_acc_mean"], s["test_acc_low"], s["test_acc_high"], s["n"])


def summary_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per studied student and resolution: its FLOPs there, zero-shot and fine-tuned test accuracy."""
    heading = objective_table.get("flops").heading
    cells: dict[tuple, dict[str, Any]] = {}
    for s in summary:
        row = cells.setdefault(
            (s["pos_embed"], s["trial_id"], s["img_size"]),
            {
                "pos_embed": s["pos_embed"],
                "trial_id": s["trial_id"],
                "trained at (px)": s["trained_img_size"],
                "px": s["img_size"],
                heading: objective_table.get("flops").show(s["flops"]),
                "zero-shot test acc": "",
                f"fine-tuned test acc ({INTERVAL_HEADING})": "",
            },
        )
        shown = _mean_interval(s) + (f", {s['failed']} failed" if s["failed"] else "")
        key = "zero-shot test acc" if s["mode"] == ZERO_SHOT else f"fine-tuned test acc ({INTERVAL_HEADING})"
        row[key] = shown if s["test_acc_low"] is None else f"{shown}, n = {s['n']}"
    return sorted(cells.values(), key=lambda r: (str(r["pos_embed"]), r["trial_id"], r["px"]))


def verdict(w: dict[str, Any]) -> str:
    """A winner's lead in words: "within noise", "beyond noise", "one seed: no interval" or "one encoding"."""
    if w["runner_up"] is None:
        return "one encoding: no runner-up"
    if w["within_noise"] is None:
        return "one seed: no interval"
    return "within noise" if w["within_noise"] else "beyond noise"


def winner_rows(winners: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The winners table: per resolution and mode, the winner, its mean, the runner-up, the lead and the verdict."""
    return [
        {
            "px": w["img_size"],
            "mode": MODE_NAMES.get(w["mode"], w["mode"]),
            "winner": f"{w['winner']} ({w['trial_id']})",
            "mean test acc": f"{w['test_acc_mean']:.4f}",
            "runner-up": "" if w["runner_up"] is None else f"{w['runner_up']} ({w['runner_up_trial_id']})",
            "its mean": "" if w["runner_up_mean"] is None else f"{w['runner_up_mean']:.4f}",
            "lead": "" if w["lead"] is None else f"{w['lead']:+.4f}",
            "Welch p": "" if w["p"] is None else f"{w['p']:.3g}",
            "lead is": verdict(w),
            "encodings": w["n_encodings"],
        }
        for w in winners
    ]


def wide_rows(wide: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The wide-against-deep table: per cost bin and depth, the mean width, students and accuracy."""
    return [
        {
            "cost bin": _cost_range(w),
            "depth": w["depth"],
            "mean embed_dim": w["embed_dim_mean"],
            "students": w["n_students"],
            "accuracy (mean [95% t interval over the students])": _interval(
                w["acc_mean"], w["acc_low"], w["acc_high"], w["n_students"]
            ),
            "accuracy is": w["metric"],
        }
        for w in wide
    ]


def _intro(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    if not rows:
        return "No study.parquet: `kdsearch study RUN --resolutions ...` adds each encoding's accuracy at other resolutions."
    encodings = ", ".join(sorted({str(s["pos_embed"]) for s in summary}))
    sizes = ", ".join(str(px) for px in sorted({s["img_size"] for s in summary}))
    epochs = sorted({int(r["finetune_epochs"]) for r in rows if r.get("finetune_epochs")})
    tuned = f"fine-tuned: {', '.join(map(str, epochs))} epochs at each resolution, " if epochs else "no fine-tuning, "
    return (
        f"{len({s['trial_id'] for s in summary})} studied students ({encodings}) at {sizes} px. Zero-shot: the trained "
        f"weights carried to the new token grid, no training (one number each: no interval); {tuned}"
        f"each mean over its seeds with its {INTERVAL}. Winner's lead: {NOISE_RULE}."
    )


def _wide_intro(wide: list[dict[str, Any]], acc: str) -> str:
    students = sum(w["n_students"] for w in wide)
    confirmed = sum(w["n_confirmed"] for w in wide)
    return (
        f"{students} completed trials in {len({w['bin'] for w in wide})} bins of equal width in log {wide[0]['cost']} "
        f"over the range they span; each student's accuracy is its {acc} from the search, or its mean test accuracy "
        f"over the seeds where `kdsearch confirm` retrained it ({confirmed} of them). The interval is over the "
        "students of a bin and depth (their spread across architectures and recipes), none for one student."
    )


def _section(run: Run) -> dict[str, Any] | None:
    """The section's data, or None when there is nothing to show."""
    rows = load_study(run)
    completed = sum(r.get("status") == Status.COMPLETED for r in run.trials)
    if not rows and completed < MIN_TRIALS:
        return None
    summary = study_summary(rows)
    acc, _ = accuracy_and_cost(run.objectives)
    wide = wide_vs_deep(run.trials, load_confirm(run), run.objectives) if completed >= MIN_TRIALS else []
    return {
        "rows": rows,
        "summary": summary,
        "winners": resolution_winners(summary),
        "wide": wide,
        "intro": _intro(rows, summary),
        "wide_intro": _wide_intro(wide, acc) if wide else "",
    }


def study_section_html(run: Run) -> str:
    """The section as HTML for report.html. Its figures carry no plotly script: the page's first
    figure inlines it, and this section comes after it.

    Args:
        run: The run.

    Returns:
        The section's HTML; "" for a run with no study.parquet and fewer than 4 completed trials.
    """
    s = _section(run)
    if s is None:
        return ""
    out = [f"<h2>{html.escape(HEADING)}</h2>", f"<p>{html.escape(s['intro'])}</p>"]
    if s["summary"]:
        out += [
            f"<h3>{html.escape(RESOLUTION_HEADING)}</h3>",
            line_figure_html(resolution_chart(s["summary"]), "study_resolution"),
            table_html(summary_rows(s["summary"])),
            f"<h3>{html.escape(WINNERS_HEADING)}</h3>",
            table_html(winner_rows(s["winners"])),
        ]
    if s["wide"]:
        out += [
            f"<h3>{html.escape(WIDE_HEADING)}</h3>",
            f"<p>{html.escape(s['wide_intro'])}</p>",
            line_figure_html(wide_chart(s["wide"]), "study_wide"),
            table_html(wide_rows(s["wide"])),
        ]
    return "\n".join(out) + "\n"


def study_section_markdown(run: Run, out: Path) -> str:
    """The section as report.md's text, its charts as PNGs beside it.

    Args:
        run: The run.
        out: The report's folder (the PNGs go there).

    Returns:
        The section's Markdown; "" for a run with no study.parquet and fewer than 4 completed trials.
    """
    s = _section(run)
    if s is None:
        return ""
    md = [f"## {HEADING}\n", s["intro"] + "\n"]
    if s["summary"]:
        save_line_png(resolution_chart(s["summary"]), Path(out) / RESOLUTION_PNG)
        md += [
            f"### {RESOLUTION_HEADING}\n",
            f"![accuracy against resolution]({RESOLUTION_PNG})\n",
            table_md(summary_rows(s["summary"])),
            f"### {WINNERS_HEADING}\n",
            table_md(winner_rows(s["winners"])),
        ]
    if s["wide"]:
        save_line_png(wide_chart(s["wide"]), Path(out) / WIDE_PNG)
        md += [
            f"### {WIDE_HEADING}\n",
            s["wide_intro"] + "\n",
            f"![wide against deep]({WIDE_PNG})\n",
            table_md(wide_rows(s["wide"])),
        ]
    return "\n".join(md)
