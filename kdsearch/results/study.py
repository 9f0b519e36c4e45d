"""What `kdsearch study` found (study.parquet): each studied student's accuracy at each
resolution, zero-shot and fine-tuned, with intervals; which encoding wins at each resolution and
whether its lead is within noise; and, from the run's own trials, wide against deep at matched cost.

study.parquet holds one row per (trial_id, img_size, mode, seed): `mode` "zero_shot" (the
trained weights carried to the new token grid, no training: one row, the trial's own seed) or
"finetuned" (carried, then a few epochs at img_size: one row per seed). The statistics are
kdsearch.results.confirm's: a mean over the completed seeds and its 95% Student t interval,
clipped to [0, 1] (`confirm.INTERVAL`; none for one seed, so never for zero-shot), and Welch's
t-test between two means (`confirm.NOISE_RULE`; no verdict when either has fewer than 2 seeds).

Wide against deep (`wide_vs_deep`) reads trials.parquet, not the study: every completed trial
with an accuracy and a positive cost, in bins of equal width in log cost over the range those
trials span, and per (bin, depth) the students' mean accuracy with a t interval over the
students (their spread across architectures and recipes, not a seed's noise). The accuracy is
a trial's confirmed mean test accuracy (confirm.parquet) where it was confirmed, else its search
accuracy (the run's accuracy objective, val_acc by default); each row's `metric` says which.

Everything is plain data (lists of dicts of numbers, strings and None), for the report and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kdsearch.errors import KdsearchError
from kdsearch.results.confirm import ACCURACY_RANGE, mean_interval, welch
from kdsearch.results.outcomes import Status
from kdsearch.results.tables import Run, RunPaths
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, Pairs, accuracy_and_cost

STUDY_FILE = RunPaths.RESOLUTIONS  # the run's study table (RunPaths.STUDY is the searcher's Optuna study)
ZERO_SHOT, FINETUNED = "zero_shot", "finetuned"  # study.parquet's `mode` values
MODES = (ZERO_SHOT, FINETUNED)
REQUIRED = ("trial_id", "pos_embed", "img_size", "mode", "seed", "status", "test_acc")
GROUP = ("trial_id", "pos_embed", "img_size", "mode")


def load_study(run: Run) -> list[dict[str, Any]]:
    """The rows of the run's study.parquet ([] when the run has none).

    Args:
        run: The run.

    Returns:
        One dict per row; one clear error when a column the study writes is missing.
    """
    rows = run.paths.rows(STUDY_FILE)
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if missing:
        raise KdsearchError(
            f"{run.paths.uri}/{STUDY_FILE}: lacks the column(s) {', '.join(missing)}; it is written by `kdsearch study`"
        )
    return rows


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def study_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (trial_id, pos_embed, img_size, mode) of study.parquet's `rows`.

    Args:
        rows: study.parquet's rows (`load_study`).

    Returns:
        Dicts with trial_id, pos_embed, img_size, trained_img_size, mode, flops, n (completed
        seeds with a test accuracy), failed, val_acc_mean, test_acc_mean, test_acc_std,
        test_acc_low and test_acc_high (the 95% t interval of the mean, clipped to [0, 1]; None
        for n < 2); by pos_embed, trial_id, mode (zero-shot first), img_size.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(_plain(r[k]) for k in GROUP), []).append(r)
    out = []
    for key, group in groups.items():
        done = [r for r in group if r.get("status") == Status.COMPLETED and r.get("test_acc") is not None]
        test = mean_interval([r["test_acc"] for r in done], ACCURACY_RANGE)
        val = mean_interval([r["val_acc"] for r in done if r.get("val_acc") is not None], ACCURACY_RANGE)
        flops = next((r.get("flops") for r in group if r.get("flops") is not None), None)
        trained = next((r.get("trained_img_size") for r in group if r.get("trained_img_size") is not None), None)
        out.append(
            {
                **dict(zip(GROUP, key)),
                "trained_img_size": _plain(trained),
                "flops": _plain(flops),
                "n": test["n"],
                "failed": sum(r.get("status") == Status.FAILED for r in group),
                "val_acc_mean": val["mean"],
                "test_acc_mean": test["mean"],
                "test_acc_std": test["std"],
                "test_acc_low": test["low"],
                "test_acc_high": test["high"],
            }
        )
    mode_order = {m: i for i, m in enumerate(MODES)}
    return sorted(
        out,
        key=lambda s: (str(s["pos_embed"]), s["trial_id"], mode_order.get(s["mode"], 9), s["mode"], s["img_size"]),
    )


def resolution_winners(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which encoding wins at each (img_size, mode), and whether its lead is within noise.

    The winner is the studied student with the highest mean test accuracy there; the runner-up
    the best student of any other encoding. Ties go to the encoding, then the trial id, first
    in sort order.

    Args:
        summary: `study_summary`'s entries.

    Returns:
        One dict per (img_size, mode) with a completed student, by img_size then mode: img_size,
        mode, winner (its pos_embed), trial_id, test_acc_mean, n, runner_up (pos_embed or None),
        runner_up_trial_id, runner_up_mean, runner_up_n, lead (winner's mean minus the
        runner-up's), p and within_noise (confirm.welch; None when either has < 2 seeds or
        there is no runner-up), n_encodings.
    """
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for s in summary:
        if s["n"] >= 1:
            cells.setdefault((s["img_size"], s["mode"]), []).append(s)
    mode_order = {m: i for i, m in enumerate(MODES)}
    out = []
    for (px, mode), there in sorted(cells.items(), key=lambda kv: (kv[0][0], mode_order.get(kv[0][1], 9))):
        there = sorted(there, key=lambda s: (-s["test_acc_mean"], str(s["pos_embed"]), s["trial_id"]))
        best = there[0]
        other = next((s for s in there if s["pos_embed"] != best["pos_embed"]), None)
        w = welch(best, other) if other is not None else {"diff": None, "p": None, "within_noise": None}
        out.append(
            {
                "img_size": px,
                "mode": mode,
                "winner": best["pos_embed"],
                "trial_id": best["trial_id"],
                "test_acc_mean": best["test_acc_mean"],
                "n": best["n"],
                "runner_up": None if other is None else other["pos_embed"],
                "runner_up_trial_id": None if other is None else other["trial_id"],
                "runner_up_mean": None if other is None else other["test_acc_mean"],
                "runner_up_n": None if other is None else other["n"],
                "lead": w["diff"],
                "p": w["p"],
                "within_noise": w["within_noise"],
                "n_encodings": len({s["pos_embed"] for s in there}),
            }
        )
    return out


def cost_bins(costs: Sequence[float], bins: int) -> list[tuple[float, float]]:
    """`bins` intervals of equal width in log cost from min(costs) to max(costs) (one when
    every cost is the same; [] for no cost); each (low, high), the last one closed above."""
    if not costs:
        return []
    lo, hi = math.log(min(costs)), math.log(max(costs))
    if hi == lo:
        return [(min(costs), max(costs))]
    width = (hi - lo) / bins
    edges = [math.exp(lo + i * width) for i in range(bins)] + [max(costs)]
    edges[0] = min(costs)
    return list(zip(edges, edges[1:]))


def _bin_of(cost: float, low: float, high: float, bins: int) -> int:
    if high == low:
        return 0
    return min(int((math.log(cost) - math.log(low)) / (math.log(high) - math.log(low)) * bins), bins - 1)


def _accuracies(
    trials: Sequence[dict[str, Any]], confirm_rows: Sequence[dict[str, Any]], acc: str, cost: str
) -> list[dict[str, Any]]:
    """Each completed trial with a positive cost and an accuracy: its cost, depth, embed_dim,
    accuracy and which metric gave it (the confirmed mean test accuracy wins over `acc`)."""
    confirmed: dict[str, list[float]] = {}
    for r in confirm_rows:
        if r.get("status") == Status.COMPLETED and r.get("test_acc") is not None:
            confirmed.setdefault(str(r["trial_id"]), []).append(float(r["test_acc"]))
    out = []
    for t in trials:
        tests = confirmed.get(str(t["trial_id"]))
        value = sum(tests) / len(tests) if tests else t.get(acc)
        if t.get("status") != Status.COMPLETED or value is None or not (t.get(cost) or 0) > 0:
            continue
        if t.get("student.depth") is None:
            continue
        out.append(
            {
                "cost": float(t[cost]),
                "depth": int(t["student.depth"]),
                "embed_dim": t.get("student.embed_dim"),
                "acc": float(value),
                "metric": "test_acc (confirmed mean)" if tests else acc,
            }
        )
    return out


def wide_vs_deep(
    trials: Sequence[dict[str, Any]],
    confirm_rows: Sequence[dict[str, Any]] = (),
    objectives: Pairs = DEFAULT_OBJECTIVES,
    bins: int = 4,
) -> list[dict[str, Any]]:
    """Accuracy against depth at matched cost, from a run's trials.

    The completed trials with a positive cost (the run's cost objective,
    kdsearch.space.objectives.accuracy_and_cost) fall into `bins` bins of equal width in log
    cost over the range they span. Each student's accuracy is its mean test accuracy over
    confirm.parquet's completed seeds where it was confirmed, else its search accuracy (the
    run's accuracy objective, val_acc by default): `metric` says which, per row.

    Args:
        trials: trials.parquet's rows.
        confirm_rows: confirm.parquet's rows ([] when the run was not confirmed).
        objectives: The run's objectives.
        bins: How many cost bins.

    Returns:
        One dict per (bin, depth) holding students, by bin then depth: bin (0-based), cost
        (its name), cost_low, cost_high, depth, embed_dim_mean, n_students, acc_mean, acc_low,
        acc_high (the 95% t interval of the mean over the students, clipped to [0, 1]; None
        for one student), n_confirmed and metric.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    acc, cost = accuracy_and_cost(objectives)
    points = _accuracies(trials, confirm_rows, acc, cost)
    edges = cost_bins([p["cost"] for p in points], bins)
    if not edges:
        return []
    low, high = edges[0][0], edges[-1][1]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((_bin_of(p["cost"], low, high, len(edges)), p["depth"]), []).append(p)
    out = []
    for (b, depth), group in sorted(groups.items()):
        stats = mean_interval([p["acc"] for p in group], ACCURACY_RANGE)
        dims = [float(p["embed_dim"]) for p in group if p["embed_dim"] is not None]
        metrics = sorted({p["metric"] for p in group})
        out.append(
            {
                "bin": b,
                "cost": cost,
                "cost_low": edges[b][0],
                "cost_high": edges[b][1],
                "depth": depth,
                "embed_dim_mean": sum(dims) / len(dims) if dims else None,
                "n_students": stats["n"],
                "acc_mean": stats["mean"],
                "acc_low": stats["low"],
                "acc_high": stats["high"],
                "n_confirmed": sum(p["metric"] != acc for p in group),
                "metric": metrics[0] if len(metrics) == 1 else " and ".join(metrics),
            }
        )
    return out
