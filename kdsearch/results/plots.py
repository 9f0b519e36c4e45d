"""Pictures of a run, each described once and drawn two ways: a PNG (matplotlib, for the
Markdown report and `--plot`) and an interactive plotly figure (the HTML report, `--html`).

A `Chart` is plain data: titled axes (each saying its unit, from the objectives table) and
`Series` of points or steps, points optionally with vertical error bars. `front_chart`,
`pe_fronts_chart`, `hypervolume_chart` and `confirmed_front_chart` build one from a run's rows; `save_png` and `to_plotly` draw any chart, so the two kinds of
picture cannot drift apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.atomic import atomic_path
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import ARCH_COLUMNS, RECIPE_COLUMNS
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Pairs, accuracy_and_cost
from kdsearch.space.specs import POS_EMBEDS

if TYPE_CHECKING:
    import plotly.graph_objects as go

PNG_SIZE = (800, 560)  # pixels of every picture: 8 x 5.6 inches at 100 dpi
# matplotlib's tab10, so a positional encoding has the same colour in every picture; every
# encoding of the table has one (the palette repeats past ten)
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
COLORS = {name: TAB10[i % len(TAB10)] for i, name in enumerate(POS_EMBEDS)}
MARKERS = {Status.COMPLETED: "circle", Status.STOPPED_EARLY: "triangle-down"}  # failed/infeasible: no accuracy
HOVER_KEYS = ("trial_id", "status", "epochs", *ARCH_COLUMNS, *RECIPE_COLUMNS, "train.lr", "train.epochs")


@dataclass
class Series:
    """One set of points or one step line of a chart, drawn alike by matplotlib and plotly."""

    name: str
    x: list[float]
    y: list[float]
    kind: str = "points"  # "points" | "steps" (a front: flat after each point until the next)
    marker: str | None = "circle"  # "circle" | "triangle-down" | None (steps without markers)
    color: str | None = None
    opacity: float = 1.0
    hover: list[str] | None = None
    legend: bool = True
    y_error: list[float | None] | None = None  # half-widths of symmetric error bars (None: no bar at that point)
    y_error_minus: list[float | None] | None = None  # lower lengths where they differ from y_error's (None: as y_error)


@dataclass
class Chart:
    """A chart as plain data: `save_png` draws it with matplotlib, `to_plotly` with plotly."""

    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)


def _axis(name: str) -> tuple[float, str]:
    o = objective_table.get(name)
    return o.scale, o.axis_label()


def _hover(r: dict[str, Any], objectives: Pairs) -> str:
    """A trial's id, status, objectives, costs and config, for a plotly tooltip."""
    keys = [*HOVER_KEYS[:2], *(m for m, _ in objectives), *objective_table.names("computed"), *HOVER_KEYS[2:]]
    return "<br>".join(f"{k}: {r.get(k)}" for k in dict.fromkeys(keys) if k in r)


def front_chart(trials: Sequence[dict[str, Any]], objectives: Pairs, title: str = "") -> Chart:
    """Every trial with an accuracy by cost and accuracy, coloured by pos_embed and shaped by
    status, and the front as a step line (drawn against the first maximized and minimized objectives)."""
    acc, cost = accuracy_and_cost(objectives)
    (xs, xl), (ys, yl) = _axis(cost), _axis(acc)
    chart = Chart(title or f"{acc} against {cost}", xl, yl)
    for status, marker in MARKERS.items():
        for pe in POS_EMBEDS:
            rows = [
                r
                for r in trials
                if r["status"] == status and r.get("student.pos_embed") == pe and r.get(acc) is not None
            ]
            if rows:
                chart.series.append(
                    Series(
                        f"{pe} ({status.value.replace('_', ' ')})",
                        [r[cost] / xs for r in rows],
                        [r[acc] / ys for r in rows],
                        marker=marker,
                        color=COLORS[pe],
                        opacity=0.85 if status is Status.COMPLETED else 0.45,
                        hover=[_hover(r, objectives) for r in rows],
                    )
                )
    front = front_rows(trials, objectives)
    if front:
        chart.series.append(
            Series(
                "front",
                [r[cost] / xs for r in front],
                [r[acc] / ys for r in front],
                kind="steps",
                marker=None,
                color="#000000",
            )
        )
    return chart


def pe_fronts_chart(fronts: dict[str, list[dict[str, Any]]], objectives: Pairs) -> Chart:
    """The front of each positional encoding, drawn together: which encoding wins at which cost."""
    acc, cost = accuracy_and_cost(objectives)
    (xs, xl), (ys, yl) = _axis(cost), _axis(acc)
    chart = Chart("the front of each positional encoding", xl, yl)
    for pe, front in fronts.items():
        chart.series.append(
            Series(
                pe,
                [r[cost] / xs for r in front],
                [r[acc] / ys for r in front],
                kind="steps",
                color=COLORS[pe],
                hover=[_hover(r, objectives) for r in front],
            )
        )
    return chart


def hypervolume_chart(by_trial: Sequence[dict[str, Any]], over: str = "time", objectives: Pairs = ()) -> Chart:
    """Normalized hypervolume (in all the run's `objectives`) after each completed trial, over
    minutes since the start (`over="time"`) or over completed trials (`over="trials"`)."""
    if over == "time":
        xs, label = [h["seconds"] / 60 for h in by_trial], "minutes since the start of the run"
    else:
        xs, label = [h["trial"] for h in by_trial], "completed trials"
    ys = [h["hypervolume"] for h in by_trial]
    names = f" of {', '.join(name for name, _ in objectives)}" if objectives else ""
    return Chart(
        f"hypervolume{names} over {over}",
        label,
        "hypervolume (share of the box from the reference to the ideal)",
        [Series("hypervolume", xs, ys, kind="steps", legend=False)],
    )


def confirmed_front_chart(summary: dict[str, Any]) -> Chart:
    """Confirmed members (kdsearch.results.confirm.summarize): mean test accuracy over the seeds
    against the first cost, error bars the 95% interval of the mean (kdsearch.results.confirm.INTERVAL:
    clipped to [0, 1], so a bar may be shorter above than below; none for a member with one seed),
    coloured by pos_embed, and the confirmed front as a step line."""
    cost = summary["cost"]
    xs, xl = _axis(cost)
    chart = Chart(
        f"confirmed with {summary['seeds']} seeds: mean test accuracy (95% t interval, clipped to [0, 1]) against {cost}",
        xl,
        "mean test accuracy over the seeds (fraction right)",
    )

    def hover(m: dict[str, Any]) -> str:
        interval = (
            "none (n = 1)" if m["test_acc_low"] is None else f"[{m['test_acc_low']:.4f}, {m['test_acc_high']:.4f}]"
        )
        return "<br>".join(
            [
                f"trial_id: {m['trial_id']}",
                f"pos_embed: {m['pos_embed']}",
                f"n: {m['n']}",
                f"test acc: {m['test_acc_mean']:.4f}, 95% interval {interval}",
                f"search val_acc: {m['search_val_acc']}",
                f"{cost}: {m.get(cost)}",
            ]
        )

    done = [m for m in summary["members"] if m["n"] >= 1 and m.get(cost) is not None]
    for pe in dict.fromkeys(m["pos_embed"] for m in done):
        rows = [m for m in done if m["pos_embed"] == pe]
        chart.series.append(
            Series(
                str(pe),
                [m[cost] / xs for m in rows],
                [m["test_acc_mean"] for m in rows],
                color=COLORS.get(pe),
                hover=[hover(m) for m in rows],
                y_error=[None if m["test_acc_low"] is None else m["test_acc_high"] - m["test_acc_mean"] for m in rows],
                y_error_minus=[
                    None if m["test_acc_low"] is None else m["test_acc_mean"] - m["test_acc_low"] for m in rows
                ],
            )
        )
    front = [m for m in summary["front"] if m.get(cost) is not None]
    if front:
        chart.series.append(
            Series(
                "confirmed front",
                [m[cost] / xs for m in front],
                [m["test_acc_mean"] for m in front],
                kind="steps",
                marker=None,
                color="#000000",
            )
        )
    return chart


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------

_MPL_MARKERS = {"circle": "o", "triangle-down": "v"}


def save_png(chart: Chart, path: str | os.PathLike) -> Path:
    """Draw `chart` with matplotlib as an 800x560 px PNG (written, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100)
    for s in chart.series:
        label = s.name if s.legend else None
        if s.kind == "points":
            ax.scatter(s.x, s.y, marker=_MPL_MARKERS[s.marker], color=s.color, alpha=s.opacity, s=36, label=label)
            if s.y_error:
                bars = [math.nan if e is None else e for e in s.y_error]
                below = [math.nan if e is None else e for e in s.y_error_minus] if s.y_error_minus else bars
                ax.errorbar(s.x, s.y, yerr=[below, bars], fmt="none", ecolor=s.color, alpha=s.opacity, capsize=3, lw=1)
        else:
            ax.step(s.x, s.y, where="post", marker=_MPL_MARKERS.get(s.marker), color=s.color, lw=1.2, label=label)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    ax.set_title(chart.title)
    ax.grid(alpha=0.3)
    if any(s.legend and len(s.x) for s in chart.series):  # an empty chart gets no legend (nor matplotlib's warning)
        ax.legend(fontsize=8, loc="best")
    return write_png(fig, path)


def write_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib figure, write it to `path` whole (atomically) and close it.

    Args:
        fig: the matplotlib figure.
        path: where the PNG goes.

    Returns:
        `path` as a Path.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def to_plotly(chart: Chart, height: int = 520) -> go.Figure:
    """The same chart as an interactive plotly figure (hover shows each trial's config)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in chart.series:
        common = {"x": s.x, "y": s.y, "name": s.name, "showlegend": s.legend}
        if s.hover:
            common.update(hovertext=s.hover, hoverinfo="text")
        if s.kind == "points":
            marker = {"symbol": s.marker, "size": 9, "opacity": s.opacity, "color": s.color}
            if s.y_error:
                common["error_y"] = {"type": "data", "array": s.y_error, "visible": True, "thickness": 1.2, "width": 4}
                if s.y_error_minus:
                    common["error_y"].update(arrayminus=s.y_error_minus, symmetric=False)
            fig.add_trace(go.Scatter(mode="markers", marker=marker, **common))
        else:
            mode = "lines+markers" if s.marker else "lines"
            fig.add_trace(go.Scatter(mode=mode, line={"shape": "hv", "color": s.color}, **common))
    fig.update_layout(
        title=chart.title, xaxis_title=chart.x_label, yaxis_title=chart.y_label, template="plotly_white", height=height
    )
    return fig


def plot_front(trials: Sequence[dict[str, Any]], objectives: Pairs, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of all trials and the front; returns its path."""
    return save_png(front_chart(trials, objectives, title), path)
