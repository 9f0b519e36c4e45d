"""What a finished (or running) run has to say: the front, its hypervolume over time, the front
of each positional encoding, which parameters matter, and what failed or stopped.

`analyze(run)` computes it once as plain data; `write_html` renders one self-contained page
(plotly, its script inlined once) and `write_markdown` the same as Markdown with PNG pictures.
"""

from __future__ import annotations

import html
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.pareto import hypervolume_history, normalized_hypervolume
from kdsearch.plots import cost_axis
from kdsearch.results import RunPaths, open_run, read_rows
from kdsearch.specs import POS_EMBEDS
from kdsearch.status import Objectives, accuracy_and_cost, front_rows

REF_FACTOR = 1.1  # the cost reference point: 1.1 x the largest cost seen
ARCH = ("student.embed_dim", "student.depth", "student.num_heads", "student.mlp_ratio", "student.patch_size",
        "student.pos_embed", "student.distill_token")
RECIPE = ("recipe.alpha", "recipe.temperature", "recipe.hard_weight", "recipe.feature_weight", "recipe.attention_weight")


@dataclass
class Run:
    paths: RunPaths
    meta: dict[str, Any]
    trials: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    objectives: Objectives

    @property
    def name(self) -> str:
        return self.paths.root.name


def load_run(path: str | os.PathLike, objectives: Sequence[str] | None = None) -> Run:
    """A run's files; `objectives` (e.g. ["val_acc", "params"]) overrides the run's own."""
    paths = open_run(path)
    meta = json.loads(paths.meta.read_text()) if paths.meta.exists() else {}
    trials = read_rows(paths.trials)
    objs = [tuple(o) for o in meta.get("objectives", [["val_acc", "max"], ["flops", "min"]])]
    if objectives:
        known = {"val_acc": "max", "best_val_acc": "max", "flops": "min", "macs": "min", "params": "min"}
        bad = [o for o in objectives if o not in known]
        if bad:
            raise KdsearchError(f"--objectives: unknown {bad[0]!r}; allowed: {', '.join(known)}")
        objs = [(o, known[o]) for o in objectives]
    return Run(paths, meta, trials, read_rows(paths.epochs), objs)


def require_finished(run: Run) -> None:
    if not any(r["status"] == "completed" for r in run.trials):
        raise KdsearchError(f"{run.paths.root}: no finished trial yet ({len(run.trials)} recorded); wait for one or check `kdsearch status`")


# --------------------------------------------------------------------------------------
# Analyses (plain data)
# --------------------------------------------------------------------------------------


@dataclass
class Hypervolume:
    value: float
    reference: dict[str, float]  # raw units: accuracy and cost at the reference point
    cost: str
    by_trial: list[dict[str, Any]] = field(default_factory=list)  # [{"trial": n, "seconds": s, "hypervolume": v}]


def hypervolume(run: Run) -> Hypervolume | None:
    """Normalized 2-D hypervolume of (accuracy, cost) against (0, 1.1 x the largest cost seen)."""
    if {mode for _, mode in run.objectives} != {"max", "min"}:
        return None
    acc, cost = accuracy_and_cost(run.objectives)
    seen = [r[cost] for r in run.trials if r.get(cost) is not None and r["status"] != "infeasible"]
    if not seen:
        return None
    ref = REF_FACTOR * max(seen)
    done = sorted((r for r in run.trials if r["status"] == "completed" and r.get(acc) is not None), key=lambda r: r.get("finished_at") or 0)
    hist = hypervolume_history(np.array([r[acc] for r in done]), np.array([r[cost] for r in done]), ref) if done else []
    started = run.meta.get("started", 0)
    by_trial = [
        {"trial": i + 1, "trial_id": r["trial_id"], "seconds": (r.get("finished_at") or started) - started, "hypervolume": float(v)}
        for i, (r, v) in enumerate(zip(done, hist))
    ]
    value = normalized_hypervolume(np.array([r[acc] for r in done]), np.array([r[cost] for r in done]), ref) if done else 0.0
    return Hypervolume(value, {acc: 0.0, cost: ref}, cost, by_trial)


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
    if not run.paths.study.exists():
        return {}
    try:
        study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run.paths.study}")
    except Exception:
        return {}
    feasible = [
        t for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for k, v in t.system_attrs.items() if k.startswith("constraints:"))
    ]
    if len(feasible) < 3:
        return {}
    sub = optuna.create_study(directions=[d.name.lower() for d in study.directions])
    sub.add_trials(feasible)
    out = {}
    varied = sorted({p for t in feasible for p in t.params if len({repr(u.params.get(p)) for u in feasible}) > 1})
    for name, params in (("accuracy", varied), ("recipe", [p for p in varied if p.startswith("recipe.")])):
        if not params:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PED-ANOVA ranks what makes its target low: the target is -accuracy
                found = optuna.importance.get_param_importances(sub, params=params, target=lambda t: -t.values[0])
            out[name] = {k: float(v) for k, v in found.items()}
        except Exception as e:  # too few distinct trials for the evaluator: say so rather than fail the report
            out[name] = {"(not enough trials)": math.nan}
            out.setdefault("_errors", {})[name] = str(e)  # type: ignore[index]
    return out


def trouble(run: Run) -> list[dict[str, Any]]:
    """Failed and early-stopped trials, with their errors and the epoch they reached."""
    return [
        {"trial_id": r["trial_id"], "status": r["status"], "epochs": r.get("epochs"), "val_acc": r.get("val_acc"), "error": r.get("error") or ""}
        for r in run.trials if r["status"] in ("failed", "stopped_early")
    ]


def front_table(run: Run) -> list[dict[str, Any]]:
    """The front as rows of plain values: id, accuracy, GFLOPs, params, architecture, recipe."""
    rows = []
    for r in front_rows(run.trials, run.objectives):
        row = {"trial_id": r["trial_id"], "val_acc": r["val_acc"], "gflops": r["flops"] / 1e9, "macs": r["macs"], "params": r["params"]}
        row.update({k.split(".", 1)[1]: _plain(r.get(k)) for k in ARCH + RECIPE})
        rows.append(row)
    return rows


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _hover(r: dict[str, Any]) -> str:
    keys = ["trial_id", "status", "val_acc", "flops", "params", "epochs", *ARCH, *RECIPE, "train.lr", "train.epochs"]
    return "<br>".join(f"{k}: {r.get(k)}" for k in keys if k in r)


def front_figure(run: Run):
    """Every trial by cost and accuracy, coloured by pos_embed and shaped by status; the front."""
    import plotly.graph_objects as go

    acc, cost = accuracy_and_cost(run.objectives)
    scale, unit = cost_axis(cost)
    fig = go.Figure()
    symbols = {"completed": "circle", "stopped_early": "triangle-down"}
    for pe in POS_EMBEDS:
        for status, symbol in symbols.items():
            rows = [r for r in run.trials if r.get("student.pos_embed") == pe and r["status"] == status and r.get(acc) is not None]
            if rows:
                fig.add_trace(go.Scatter(
                    x=[r[cost] / scale for r in rows], y=[r[acc] * 100 for r in rows], mode="markers",
                    name=f"{pe} ({status.replace('_', ' ')})", marker={"symbol": symbol, "size": 9, "opacity": 1 if status == "completed" else 0.5},
                    hovertext=[_hover(r) for r in rows], hoverinfo="text", legendgroup=pe,
                ))
    front = front_rows(run.trials, run.objectives)
    if front:
        fig.add_trace(go.Scatter(x=[r[cost] / scale for r in front], y=[r[acc] * 100 for r in front], mode="lines",
                                 line={"shape": "hv", "color": "black"}, name="front", hoverinfo="skip"))
    fig.update_layout(title=f"{run.name}: accuracy against {cost}", xaxis_title=unit, yaxis_title=f"{acc} (%)",
                      template="plotly_white", height=520)
    return fig


def pe_fronts_figure(run: Run):
    import plotly.graph_objects as go

    acc, cost = accuracy_and_cost(run.objectives)
    scale, unit = cost_axis(cost)
    fig = go.Figure()
    for pe, front in pe_fronts(run).items():
        fig.add_trace(go.Scatter(x=[r[cost] / scale for r in front], y=[r[acc] * 100 for r in front], mode="lines+markers",
                                 line={"shape": "hv"}, name=pe, hovertext=[_hover(r) for r in front], hoverinfo="text"))
    fig.update_layout(title="the front of each positional encoding", xaxis_title=unit, yaxis_title=f"{acc} (%)",
                      template="plotly_white", height=480)
    return fig


def hv_figure(hv: Hypervolume):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("over trials", "over wall time"))
    xs = [h["trial"] for h in hv.by_trial]
    ts = [h["seconds"] / 60 for h in hv.by_trial]
    ys = [h["hypervolume"] for h in hv.by_trial]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line={"shape": "hv"}, name="by trial"), row=1, col=1)
    fig.add_trace(go.Scatter(x=ts, y=ys, mode="lines+markers", line={"shape": "hv"}, name="by time"), row=1, col=2)
    fig.update_xaxes(title_text="completed trials", row=1, col=1)
    fig.update_xaxes(title_text="minutes since the start", row=1, col=2)
    fig.update_yaxes(title_text="normalized hypervolume", row=1, col=1)
    fig.update_layout(template="plotly_white", height=380, showlegend=False)
    return fig


def importance_figure(imp: dict[str, float], title: str):
    import plotly.graph_objects as go

    items = sorted(((k, v) for k, v in imp.items() if not math.isnan(v)), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h"))
    fig.update_layout(title=title, xaxis_title="importance for val_acc (normalized)", template="plotly_white", height=120 + 28 * len(items))
    return fig


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def write_report(run: Run, out: str | os.PathLike) -> tuple[Path, Path]:
    """report.html (self-contained) and report.md (with PNGs beside it) in `out`."""
    require_finished(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hv = hypervolume(run)
    imp = importances(run)
    return write_html(run, hv, imp, out / "report.html"), write_markdown(run, hv, imp, out)


def _table_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_html(run: Run, hv: Hypervolume | None, imp: dict[str, Any], path: Path) -> Path:
    figures = [("The front", front_figure(run)), ("Which encoding wins where", pe_fronts_figure(run))]
    if hv and hv.by_trial:
        figures.append(("Hypervolume over time", hv_figure(hv)))
    for name, title in (("accuracy", "Parameter importance for accuracy"), ("recipe", "Importance of the distillation recipe")):
        if name in imp and not all(math.isnan(v) for v in imp[name].values()):
            figures.append((title, importance_figure(imp[name], title)))
    parts = []
    for i, (title, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False, div_id=f"fig{i}"))
    hv_text = (
        f"<p>hypervolume <b>{hv.value:.4f}</b> (normalized: accuracy against the reference 0, {hv.cost} divided by the reference "
        f"{hv.reference[hv.cost]:,.0f} = {REF_FACTOR} x the largest seen)</p>" if hv else ""
    )
    counts = {s: sum(r["status"] == s for r in run.trials) for s in ("completed", "stopped_early", "infeasible", "failed")}
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdsearch report: {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{background:#f3f3f3}}</style>
<script>window.kdsearchErrors=[];window.addEventListener("error",function(e){{window.kdsearchErrors.push(String(e.message));document.title="ERROR "+e.message;}});</script>
</head><body>
<h1>kdsearch report: {html.escape(run.name)}</h1>
<p>{len(run.trials)} trials: {", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())}. Objectives: {", ".join(f"{m} ({d})" for m, d in run.objectives)}.
FLOPs are per image at inference, 2 per multiply-add, attention matmuls included.</p>
{hv_text}
<h2>Front members</h2>
{_table_html(front_table(run))}
{''.join(parts)}
<h2>Failed and early-stopped trials</h2>
{_table_html(trouble(run))}
</body></html>
"""
    write_text_atomic(path, page)
    return path


def _table_md(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "none\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]).replace("|", "/") for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(run: Run, hv: Hypervolume | None, imp: dict[str, Any], out: Path) -> Path:
    from kdsearch.plots import plot_front, plot_hypervolume, plot_pe_fronts

    plot_front(run.trials, run.objectives, out / "front.png", title=run.name)
    plot_pe_fronts(pe_fronts(run), run.objectives, out / "pe_fronts.png")
    md = [f"# kdsearch report: {run.name}\n", f"{len(run.trials)} trials. Objectives: {', '.join(f'{m} ({d})' for m, d in run.objectives)}.\n"]
    if hv:
        md.append(f"Hypervolume **{hv.value:.4f}** (normalized; reference: accuracy 0, {hv.cost} {hv.reference[hv.cost]:,.0f} = {REF_FACTOR} x the largest seen).\n")
    md += ["## Front members\n", _table_md(front_table(run)), "![the front](front.png)\n"]
    md += ["## Which encoding wins where\n", "![the front of each positional encoding](pe_fronts.png)\n"]
    if hv and hv.by_trial:
        plot_hypervolume(hv.by_trial, out / "hypervolume.png")
        md += ["## Hypervolume over time\n", "![hypervolume](hypervolume.png)\n"]
    for name in ("accuracy", "recipe"):
        if name in imp:
            md += [f"## Importance for {name}\n", _table_md([{"parameter": k, "importance": v} for k, v in imp[name].items()])]
    md += ["## Failed and early-stopped trials\n", _table_md(trouble(run))]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(md))
    return path


def write_front_html(run: Run, path: str | os.PathLike) -> Path:
    """The interactive front alone (a trial's full config on hover), self-contained."""
    with atomic_path(path) as tmp:
        front_figure(run).write_html(str(tmp), include_plotlyjs="inline", full_html=True)
    return Path(path)
