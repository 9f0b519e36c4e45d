"""The report's "One-shot screening" section for a `search.strategy: oneshot` run: each stage's
time and share of the run, the supernet's epochs, how many subnets were screened and kept, and
every trained student's inherited val accuracy against its trained one, with Kendall's tau and
one sentence on how far the screening's ranking can be trusted.

`oneshot_html` and `oneshot_markdown` are what kdsearch.results.report calls; both return
nothing for a standard run, so its report is unchanged. The chart is a kdsearch.results.plots
`Chart`, drawn as a PNG for the Markdown and with plotly for the page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from kdsearch.results.oneshot import OneShot, load_oneshot
from kdsearch.results.plots import COLORS, Chart, Series, save_png, to_plotly
from kdsearch.results.report_tables import table_html, table_md
from kdsearch.results.tables import Run

HEADING = "One-shot screening: a weight-sharing supernet scored subnets, the kept ones were trained"
STAGES_HEADING = "Stages: each one's wall time and its share of the run"
EPOCHS_HEADING = "Supernet training: each epoch's loss, time and its largest and smallest subnet's val accuracy"
CHART_HEADING = "Inherited against trained accuracy: each trained student's screening score and its val_acc"
CHART_PNG = "oneshot_tau.png"
EPOCH_COLUMNS = ("epoch", "loss", "seconds", "images_per_s", "largest_val_acc", "smallest_val_acc")


def trust_sentence(shot: OneShot) -> str:
    """One plain sentence on how far the screening's ranking agrees with training (tau and n)."""
    n = shot.tau_n
    if shot.kendall_tau is not None:
        p = f"; p = {shot.tau_pvalue:.2g} against no agreement" if shot.tau_pvalue is not None else ""
        return (
            f"The screening's rank agreement with training is Kendall's tau = {shot.kendall_tau:.2f} over n = {n} "
            f"trained students (1: the screening orders them as training does, 0: no agreement, -1: the reverse{p})."
        )
    if n < 3:
        return (
            f"Kendall's tau needs at least 3 trained students with an inherited score and the run has {n}: "
            "the screening's rank agreement with training is not measured."
        )
    side = "inherited" if len({t["inherited_val_acc"] for t in shot.trained}) < 2 else "trained"
    return (
        f"Kendall's tau is undefined over these n = {n} trained students, as every {side} accuracy is the same: "
        "the screening's rank agreement with training cannot be measured from them."
    )


def screening_summary(shot: OneShot) -> str:
    """How many subnets were scored, over the budget, on the screened front and kept; how many
    completed trials trained a screened subnet."""
    rows = shot.screening
    scored = sum(1 for r in rows if r.get("inherited_val_acc") is not None)
    over = sum(1 for r in rows if r.get("feasible") is False)
    front = sum(1 for r in rows if r.get("rank") == 1)
    target = (shot.stages.get("screening") or {}).get("of")
    of = f"the screening's target: {target}; " if target is not None else ""
    own = f" and {shot.unmatched} a student Optuna sampled itself, never screened" if shot.unmatched else ""
    return (
        f"{scored} subnets scored with inherited weights ({of}{over} more over the budget, recorded unscored): "
        f"{front} on the screened front, {shot.kept} kept for training. "
        f"Of the completed trials, {shot.tau_n} trained a screened subnet{own}. "
        "Every number on the run's front is a trained student's, never an inherited score."
    )


def stage_rows(shot: OneShot, trials: int) -> list[dict[str, Any]]:
    """One row per stage: what it did, its seconds and its share of the run's wall time."""
    sup, scr = shot.stages.get("supernet") or {}, shot.stages.get("screening") or {}
    what = {
        "setup": "the data and the teacher's logits, before the supernet",
        "supernet": f"{sup.get('epochs', 0)} of {sup.get('of', '?')} epochs",
        "screening": f"{scr.get('scored', 0)} of {scr.get('of', '?')} subnets scored",
        "training": f"{trials} trials: each kept student trained, with its recipe searched",
    }
    rows = [
        {
            "stage": stage,
            "what": what[stage],
            "seconds": shot.seconds.get(stage),
            "share of the run": _pct(shot.share(stage)),
        }
        for stage in what
    ]
    return rows + [
        {"stage": "run", "what": "start to end (or now)", "seconds": shot.run_seconds, "share of the run": "100%"}
    ]


def _pct(share: float | None) -> str:
    return "" if share is None else f"{share:.1%}"


def tau_chart(shot: OneShot) -> Chart:
    """Every trained student's inherited val accuracy (x) against its trained val_acc (y),
    coloured by positional encoding; tau and n in the title."""
    tau = "undefined" if shot.kendall_tau is None else f"{shot.kendall_tau:.3f}"
    chart = Chart(
        f"inherited against trained val accuracy: Kendall's tau = {tau}, n = {shot.tau_n}",
        "inherited val accuracy (supernet's weights, no training; fraction right)",
        "trained val_acc (fraction right)",
    )
    for pe in dict.fromkeys(t.get("student.pos_embed") for t in shot.trained):
        rows = [t for t in shot.trained if t.get("student.pos_embed") == pe]
        hover = [
            f"trial_id: {t['trial_id']}<br>subnet_id: {t['subnet_id']}<br>inherited: {t['inherited_val_acc']:.4f}"
            f"<br>trained: {t['val_acc']:.4f}<br>pos_embed: {pe}"
            for t in rows
        ]
        chart.series.append(
            Series(
                str(pe),
                [t["inherited_val_acc"] for t in rows],
                [t["val_acc"] for t in rows],
                color=COLORS.get(pe),
                hover=hover,
            )
        )
    return chart


def trained_rows(shot: OneShot) -> list[dict[str, Any]]:
    """The pairs behind the chart, best trained first."""
    keys = ("trial_id", "subnet_id", "inherited_val_acc", "val_acc")
    return [{k: t[k] for k in keys} for t in sorted(shot.trained, key=lambda t: -t["val_acc"])]


def _epochs(shot: OneShot) -> list[dict[str, Any]]:
    return [{k: e.get(k) for k in EPOCH_COLUMNS} for e in shot.supernet_epochs]


def oneshot_html(run: Run) -> str:
    """The section as HTML for report.html ("" for a standard run). Its figure carries no
    plotly script: the page's first figure inlines it, and this section comes after it."""
    shot = load_oneshot(run.paths)
    if shot is None:
        return ""
    figure = to_plotly(tau_chart(shot)).to_html(full_html=False, include_plotlyjs=False, div_id="oneshot")
    return f"""<h2>{html.escape(HEADING)}</h2>
<p>{html.escape(screening_summary(shot))}</p>
<p><b>{html.escape(trust_sentence(shot))}</b></p>
<h3>{html.escape(STAGES_HEADING)}</h3>
{table_html(stage_rows(shot, len(run.trials)))}
<h3>{html.escape(EPOCHS_HEADING)}</h3>
{table_html(_epochs(shot))}
<h3>{html.escape(CHART_HEADING)}</h3>
{figure}
{table_html(trained_rows(shot))}
"""


def oneshot_markdown(run: Run, out: Path) -> list[str]:
    """The section as report.md's lines ([] for a standard run); its chart as a PNG in `out`."""
    shot = load_oneshot(run.paths)
    if shot is None:
        return []
    save_png(tau_chart(shot), out / CHART_PNG)
    return [
        f"## {HEADING}\n",
        screening_summary(shot) + "\n",
        f"**{trust_sentence(shot)}**\n",
        f"### {STAGES_HEADING}\n",
        table_md(stage_rows(shot, len(run.trials))),
        f"### {EPOCHS_HEADING}\n",
        table_md(_epochs(shot)),
        f"### {CHART_HEADING}\n",
        f"![inherited against trained accuracy]({CHART_PNG})\n",
        table_md(trained_rows(shot)),
    ]
