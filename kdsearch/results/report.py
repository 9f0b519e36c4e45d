"""What a finished (or running) run has to say: the front, its hypervolume over time, the front
of each positional encoding, which parameters matter, and what failed or stopped.

The analyses (`hypervolume`, `pe_fronts`, `importances`, `trouble`, `front_table`, and for a
confirmed run kdsearch.results.confirm's summary) are plain data; `write_html` renders one self-contained page (plotly, its script inlined once) and
`write_markdown` the same as Markdown with PNG pictures, both from kdsearch.results.plots' charts.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.results.confirm import display_tables, load_confirm, summarize
from kdsearch.results.hypervolume import Hypervolume, hypervolume_of, run_reference
from kdsearch.results.oneshot_report import oneshot_html, oneshot_markdown
from kdsearch.results.outcomes import STATUSES, Status, counts
from kdsearch.results.pareto import front_rows
from kdsearch.results.plots import (
    confirmed_front_chart,
    front_chart,
    hypervolume_chart,
    pe_fronts_chart,
    save_png,
    to_plotly,
)
from kdsearch.results.report_tables import table_html, table_md
from kdsearch.results.study_report import study_section_html, study_section_markdown
from kdsearch.results.tables import Run, RunPaths, front_records, require_finished
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import accuracy_and_cost
from kdsearch.space.specs import POS_EMBEDS

if TYPE_CHECKING:
    import plotly.graph_objects as go

# --------------------------------------------------------------------------------------
# Analyses (plain data)
# --------------------------------------------------------------------------------------


def hypervolume(run: Run) -> Hypervolume:
    """The run's normalized hypervolume in all its objectives, against its reference point
    (run.json's, else its space's: kdsearch.results.hypervolume), with its history; or a
    Hypervolume whose `why_not` says why there is none."""
    reference, why = run_reference(run.paths, run.meta, run.objectives)
    return hypervolume_of(run.trials, run.objectives, reference, run.meta.get("started", 0), why)


def pe_fronts(run: Run) -> dict[str, list[dict[str, Any]]]:
    """The front of each positional encoding on its own: which encoding wins at which cost."""
    out = {}
    for pe in POS_EMBEDS:
        rows = [r for r in run.trials if r.get("student.pos_embed") == pe]
        front = front_rows(rows, run.objectives)
        if front:
            out[pe] = front
    return out


def importances(run: Run) -> dict[str, dict[str, float]]:
    """Optuna's importance evaluator (PED-ANOVA by default) for accuracy, over the completed
    feasible trials: all searched parameters, and the distillation recipe's alone."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recorded = _study_trials(run)
    if recorded is None:
        return {}
    trials, directions = recorded
    feasible = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))
    ]
    if len(feasible) < 3:
        return {}
    study_objectives = [name for name, _ in run.meta.get("objectives", run.objectives)]
    acc, _ = accuracy_and_cost(run.objectives)
    index = study_objectives.index(acc) if acc in study_objectives else 0
    sub = optuna.create_study(directions=[d.name.lower() for d in directions])
    sub.add_trials(feasible)
    out = {}
    varied = sorted({p for t in feasible for p in t.params if len({repr(u.params.get(p)) for u in feasible}) > 1})
    for name, params in (("accuracy", varied), ("recipe", [p for p in varied if p.startswith("recipe.")])):
        if not params:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PED-ANOVA ranks what makes its target low: the target is -accuracy
                found = optuna.importance.get_param_importances(sub, params=params, target=lambda t: -t.values[index])
            out[name] = {k: float(v) for k, v in found.items()}
        except Exception as e:  # too few distinct trials for the evaluator: say so rather than fail the report
            out[name] = {"(not enough trials)": math.nan}
            out.setdefault("_errors", {})[name] = str(e)  # type: ignore[index]
    return out


def _study_trials(run: Run) -> tuple[list, list] | None:
    """The trials and directions of the run's study.db (copied out of a bucket first), or None."""
    import optuna

    store = run.paths.store
    if not store.exists(RunPaths.STUDY):
        return None
    with tempfile.TemporaryDirectory(prefix="kdsearch-study-") as tmp:
        local = store.local_path(RunPaths.STUDY) or store.download(RunPaths.STUDY, Path(tmp) / "study.db")
        try:
            study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{local}")
            return study.trials, study.directions
        except Exception:  # an unreadable or foreign study.db: the report goes on without importances
            return None


def trouble(run: Run) -> list[dict[str, Any]]:
    """Failed and early-stopped trials, with their errors and the epoch they reached."""
    return [
        {
            "trial_id": r["trial_id"],
            "status": r["status"],
            "epochs": r.get("epochs"),
            "val_acc": r.get("val_acc"),
            "error": r.get("error") or "",
        }
        for r in run.trials
        if r["status"] in (Status.FAILED, Status.STOPPED_EARLY)
    ]


def throughput_table(run: Run) -> list[dict[str, Any]]:
    """Each trained trial's throughput: mean images/s over its epochs, the share of time it
    waited for data, its largest peak device memory (MiB) and mean MFU, where measured."""
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for e in run.epochs:
        by_trial.setdefault(e["trial_id"], []).append(e)

    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        return sum(vals) / len(vals) if vals else None

    out = []
    for tid, rows in sorted(by_trial.items()):
        peaks = [
            float(r["peak_memory"])
            for r in rows
            if r.get("peak_memory") is not None and not math.isnan(r["peak_memory"])
        ]
        out.append(
            {
                "trial_id": tid,
                "epochs": len(rows),
                "images_per_second": mean(rows, "images_per_second"),
                "data_wait_share": mean(rows, "data_wait_share"),
                "peak_memory_mib": max(peaks) / 2**20 if peaks else None,
                "mfu": mean(rows, "mfu"),
            }
        )
    return out


def front_table(run: Run) -> list[dict[str, Any]]:
    """The front as rows of plain values: id, every objective, costs, architecture, recipe."""
    return front_records(front_rows(run.trials, run.objectives), run.objectives)


def importance_titles(run: Run) -> dict[str, str]:
    """The heading of each of `importances`' sections: what the importance is of, and for what.

    Args:
        run: The run.

    Returns:
        {"accuracy": ..., "recipe": ...}: the same keys as `importances`.
    """
    acc, _ = accuracy_and_cost(run.objectives)
    how = "PED-ANOVA over the completed feasible trials, normalized to sum to 1"
    return {
        "accuracy": f"Importance of each searched setting for {acc} ({how})",
        "recipe": f"Importance of each distillation-recipe setting for {acc} ({how})",
    }


def _front_heading(run: Run) -> str:
    objectives = " and ".join(f"{m} ({d})" for m, d in run.objectives)
    return f"Front members: the trials no other trial beats in {objectives}"


def importance_figure(imp: dict[str, float], title: str) -> go.Figure:
    """A horizontal bar per parameter of `imp` (one of `importances`), least important at the
    bottom; parameters whose importance is NaN are left out."""
    import plotly.graph_objects as go

    items = sorted(((k, v) for k, v in imp.items() if not math.isnan(v)), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h"))
    fig.update_layout(
        title=title,
        xaxis_title="importance (normalized: the parameters' sum to 1)",
        template="plotly_white",
        height=120 + 28 * len(items),
    )
    return fig


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def write_report(run: Run, out: str | os.PathLike) -> tuple[Path, Path]:
    """report.html (self-contained) and report.md (with PNGs beside it) in `out`; with a
    "Confirmed with S seeds" section when the run has confirm.parquet, and a "One-shot
    screening" one for a one-shot run (kdsearch.results.oneshot_report)."""
    require_finished(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hv = hypervolume(run)
    imp = importances(run)
    confirm = confirmed(run)
    return write_html(run, hv, imp, out / "report.html", confirm), write_markdown(run, hv, imp, out, confirm)


def confirmed(run: Run) -> dict[str, Any] | None:
    """kdsearch.results.confirm's summary of the run's confirm.parquet, or None without one."""
    rows = load_confirm(run)
    return summarize(rows, run.trials, run.objectives) if rows else None


CONFIRM_CHART = (
    "Confirmed front: each member's mean test accuracy and 95% interval against its cost",
    "confirm_front.png",
)
NOISE_HEADING = "Neighbours on the confirmed front: is their test-accuracy difference within noise?"
ENCODINGS_HEADING = "Which encoding wins at which cost: each encoding's best mean test accuracy, with intervals"
TROUBLE_HEADING = "Failed and early-stopped trials: the epoch each reached and its error"
THROUGHPUT_HEADING = "Throughput: each trial's images/s, data wait, peak memory and MFU"


def _confirm_heading(confirm: dict[str, Any]) -> str:
    return f"Confirmed with {confirm['seeds']} seeds: mean test accuracy on the held-out split ({confirm['interval']})"


def _confirm_intro(confirm: dict[str, Any]) -> str:
    members = len(confirm["members"])
    failed = f", {confirm['failed']} failed and left out" if confirm["failed"] else ""
    return (
        f"{members} members retrained with {confirm['seeds']} seeds each ({confirm['retrainings']} retrainings{failed}), "
        "each scored on the held-out test split. Quote a member's mean test accuracy with its 95% interval "
        "(mean +- t(0.975; n - 1) x std / sqrt(n), Student t over its n completed seeds, clipped to [0, 1] where "
        "it reaches past: a bound so moved is marked clipped), not the search's val "
        "accuracy: that is one seed, on the split the search selected by, the best of many trials, so optimistic. "
        f"The confirmed front: the members no other dominates in {', '.join(m for m, _ in confirm['objectives'])}."
    )


def _confirm_html(confirm: dict[str, Any], figure: str) -> str:
    tables = display_tables(confirm)
    notes = (
        "".join(f"<li>{html.escape(r['note'])}</li>" for r in confirm["noise"]) or "<li>one member on the front</li>"
    )
    return f"""<h2>{html.escape(_confirm_heading(confirm))}</h2>
<p>{html.escape(_confirm_intro(confirm))}</p>
{table_html(tables["members"])}
<h3>{CONFIRM_CHART[0]}</h3>
{figure}
<h3>{NOISE_HEADING}</h3>
<p>Rule: {html.escape(confirm["noise_rule"])}.</p>
<ul>{notes}</ul>
<h3>{ENCODINGS_HEADING}</h3>
<p>At {html.escape(confirm["thresholds"])}; against the best encoding there, by the same rule.</p>
{table_html(tables["encodings"])}
"""


def _charts(run: Run, hv: Hypervolume) -> list[tuple[str, str, Any]]:
    """(title, PNG file name, chart) of every picture both reports draw; each title says what it shows."""
    acc, cost = accuracy_and_cost(run.objectives)
    axes = f"{acc} against {cost}"
    front = front_chart(run.trials, run.objectives, title=run.name)
    by_pe = pe_fronts_chart(pe_fronts(run), run.objectives)
    charts = [
        (f"The front: every trial's {axes}, the front joined", "front.png", front),
        (f"Which encoding wins where: each positional encoding's front, {axes}", "pe_fronts.png", by_pe),
    ]
    if hv.by_trial:
        for title, png, over in (
            ("Hypervolume over completed trials: of the front so far, after each", "hypervolume_trials.png", "trials"),
            ("Hypervolume over time: of the front so far, by the search's clock", "hypervolume.png", "time"),
        ):
            charts.append((title, png, hypervolume_chart(hv.by_trial, over, run.objectives)))
    return charts


def _summary(run: Run) -> str:
    c = counts([r["status"] for r in run.trials])
    objectives = ", ".join(f"{m} ({d}; {objective_table.get(m).unit or 'as recorded'})" for m, d in run.objectives)
    ended = ", ".join(f"{c[s]} {s.replace('_', ' ')}" for s in STATUSES)
    return f"{len(run.trials)} trials: {ended}. Objectives: {objectives}."


def write_html(
    run: Run, hv: Hypervolume, imp: dict[str, Any], path: Path, confirm: dict[str, Any] | None = None
) -> Path:
    """report.html at `path`: one self-contained page (plotly's script inlined once).

    Args:
        run: The run.
        hv: Its hypervolume (`hypervolume`).
        imp: Its parameter importances (`importances`).
        path: Where the page goes.
        confirm: The summary of its confirm.parquet (`confirmed`), or None without one.

    Returns:
        `path`.
    """
    figures = [(title, to_plotly(chart)) for title, _, chart in _charts(run, hv)]
    for name, title in importance_titles(run).items():
        if name in imp and not all(math.isnan(v) for v in imp[name].values()):
            figures.append((title, importance_figure(imp[name], title)))
    confirm_html = ""
    if confirm:  # first on the page, so its figure carries plotly's script
        fig = to_plotly(confirmed_front_chart(confirm))
        confirm_html = _confirm_html(confirm, fig.to_html(full_html=False, include_plotlyjs="inline", div_id="confirm"))
    parts = []
    for i, (title, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        script = "inline" if i == 0 and not confirm else False
        parts.append(fig.to_html(full_html=False, include_plotlyjs=script, div_id=f"fig{i}"))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdsearch report: {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{background:#f3f3f3}}</style>
<script>window.kdsearchErrors=[];window.addEventListener("error",function(e){{window.kdsearchErrors.push(String(e.message));document.title="ERROR "+e.message;}});</script>
</head><body>
<h1>kdsearch report: {html.escape(run.name)}</h1>
<p>{html.escape(_summary(run))}</p>
<p>{html.escape(hv.describe())}</p>
<h2>{html.escape(_front_heading(run))}</h2>
{table_html(front_table(run))}
{confirm_html}{"".join(parts)}{oneshot_html(run)}{study_section_html(run)}
<h2>{TROUBLE_HEADING}</h2>
{table_html(trouble(run))}
<h2>{THROUGHPUT_HEADING}</h2>
<p>Per trial, over its epochs: training images per second, the share of time spent waiting for data, the
peak device memory and the model FLOPs utilization (3 x FLOPs per image x images/s over the device's bf16
peak; empty on CPUs).</p>
{table_html(throughput_table(run))}
</body></html>
"""
    write_text_atomic(path, page)
    return path


def write_markdown(
    run: Run, hv: Hypervolume, imp: dict[str, Any], out: Path, confirm: dict[str, Any] | None = None
) -> Path:
    """report.md in the folder `out`, its pictures as PNGs beside it; the arguments as
    `write_html`'s. Returns the path of report.md."""
    md = [
        f"# kdsearch report: {run.name}\n",
        _summary(run) + "\n",
        hv.describe() + "\n",
        f"## {_front_heading(run)}\n",
        table_md(front_table(run)),
    ]
    if confirm:
        tables = display_tables(confirm)
        title, png = CONFIRM_CHART
        save_png(confirmed_front_chart(confirm), out / png)
        md += [
            f"## {_confirm_heading(confirm)}\n",
            _confirm_intro(confirm) + "\n",
            table_md(tables["members"]),
            f"### {title}\n",
            f"![{title.split(':')[0].lower()}]({png})\n",
            f"### {NOISE_HEADING}\n",
            f"Rule: {confirm['noise_rule']}.\n",
            "\n".join(f"- {r['note']}" for r in confirm["noise"]) + "\n"
            if confirm["noise"]
            else "- one member on the front\n",
            f"### {ENCODINGS_HEADING}\n",
            f"At {confirm['thresholds']}; against the best encoding there, by the same rule.\n",
            table_md(tables["encodings"]),
        ]
    for title, png, chart in _charts(run, hv):
        save_png(chart, out / png)
        md += [f"## {title}\n", f"![{title.split(':')[0].lower()}]({png})\n"]
    for name, title in importance_titles(run).items():
        if name in imp:
            md += [
                f"## {title}\n",
                table_md([{"parameter": k, "importance": v} for k, v in imp[name].items()]),
            ]
    md += oneshot_markdown(run, out)  # a one-shot run's section; nothing for a standard run
    md += [study] if (study := study_section_markdown(run, out)) else []
    md += [f"## {TROUBLE_HEADING}\n", table_md(trouble(run))]
    md += [f"## {THROUGHPUT_HEADING}\n", table_md(throughput_table(run))]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md))
    return path


def write_front_html(run: Run, path: str | os.PathLike) -> Path:
    """The interactive front alone (a trial's full config on hover), self-contained."""
    with atomic_path(path) as tmp:
        to_plotly(front_chart(run.trials, run.objectives, title=run.name)).write_html(
            str(tmp), include_plotlyjs="inline", full_html=True
        )
    return Path(path)
