"""What retraining front members with several seeds says (confirm.parquet, written by `kdsearch
confirm`): each member's mean and spread, the confirmed front, which neighbours on it are
within noise, and which positional encoding wins at which cost, each with its 95% interval.

The search's `val_acc` is one seed's accuracy on the split the search selected by: the best of
many trials, so it is optimistic. The number to quote is a member's mean test accuracy over its
seeds with its interval. The formulas (x_1..x_n: a member's test accuracies over its n completed
seeds; failed retrainings are left out):

    mean = (x_1 + ... + x_n) / n
    s    = sqrt(sum_i (x_i - mean)^2 / (n - 1))                  sample std (ddof=1); none for n = 1
    95% interval of the mean = mean +- t(0.975; n - 1) * s / sqrt(n)    Student t; none for n = 1
                               clipped to [0, 1]                        (`INTERVAL`)

An accuracy lies in [0, 1], and the t interval of a few seeds near 1 reaches past it (two seeds
0.93 and 0.99: 0.96 +- 12.7 * 0.03 = [0.58, 1.34]). Clipping it to [0, 1] drops only values no
accuracy can take, so the clipped interval holds the true mean accuracy exactly as often as the t
interval does (its coverage is unchanged), and it is the t interval wherever that lies inside
[0, 1]. Every view says so: the tables' headings name the clipped t interval and a bound that
clipping moved is marked "clipped" (`clipped`). Mean and std are the seeds' own, unclipped.

Two members a and b (Welch's t-test: unequal variances, unequal n):

    d   = mean_a - mean_b,   v = s^2 / n for each,   se = sqrt(v_a + v_b)
    dof = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1))      Welch-Satterthwaite
    95% interval of d = d +- t(0.975; dof) * se,   p = 2 * P(T_dof > |d| / se)

**Within noise** (`NOISE_RULE`): p >= 0.05, which is the same as the 95% interval of d holding 0.
With n < 2 for either member there is no variance to test: the answer is "cannot tell".

The analyses are plain data (lists of dicts of numbers, strings and None), for the report, the
CLI's table and its JSON/CSV; `display_tables` formats them once for every view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import non_dominated_mask
from kdsearch.results.tables import ARCH_COLUMNS, Run, RunPaths
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, Pairs, accuracy_and_cost

LEVEL = 0.95
ALPHA = 1 - LEVEL
NOISE_RULE = (
    "Welch's t-test on the seeds' test accuracies, two-sided: within noise when p >= 0.05 "
    "(the same as the 95% interval of the difference of the means holding 0)"
)
INTERVAL = "95% Student t interval of the mean over the seeds, clipped to [0, 1] (accuracies lie there)"
INTERVAL_HEADING = "mean [95% t interval, clipped to 0..1]"
ACCURACY_RANGE = (0.0, 1.0)
THRESHOLDS = "every distinct {cost} of a confirmed member: the best member of each encoding at or under it"


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def t_quantile(dof: float, level: float = LEVEL) -> float:
    """The two-sided Student t quantile: t(0.5 + level / 2; dof) (4.303 for 2 dof at 95%)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def mean_interval(values: Sequence[float], within: tuple[float, float] | None = None) -> dict[str, Any]:
    """n, mean, sample std (ddof=1) and the 95% Student t interval of the mean of `values`
    (std and interval None for n = 1; everything but n None for n = 0), its bounds clipped to
    `within` (low, high) when given: `ACCURACY_RANGE` for accuracies (see the module docstring)."""
    x = np.asarray([float(v) for v in values], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "low": None, "high": None}
    std = float(x.std(ddof=1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high}


def clipped(low: float | None, high: float | None, within: tuple[float, float] = ACCURACY_RANGE) -> bool:
    """Whether an interval `mean_interval` clipped to `within` had a bound moved by the clipping:
    a bound on the edge of a wider-than-a-point interval (seeds that all agree give low == high
    with no clipping; a t bound landing exactly on the edge is the only other way there)."""
    return low is not None and high is not None and low < high and (low == within[0] or high == within[1])


def welch(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Welch's comparison of two members' mean test accuracies (a's minus b's): the difference,
    its 95% interval, the degrees of freedom, the two-sided p and whether that is within noise
    (None, with interval and p None, when either has fewer than 2 completed seeds)."""
    d = None if a["test_acc_mean"] is None or b["test_acc_mean"] is None else a["test_acc_mean"] - b["test_acc_mean"]
    out = {"diff": d, "diff_low": None, "diff_high": None, "dof": None, "p": None, "within_noise": None}
    if a["n"] < 2 or b["n"] < 2:
        return out
    va, vb = a["test_acc_std"] ** 2 / a["n"], b["test_acc_std"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    if se == 0:  # every seed of both gave one value: any difference is real, none is noise
        return {**out, "diff_low": d, "diff_high": d, "p": 1.0 if d == 0 else 0.0, "within_noise": d == 0}
    from scipy.stats import t

    dof = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    half = t_quantile(dof) * se
    p = float(2 * t.sf(abs(d) / se, dof))
    return {"diff": d, "diff_low": d - half, "diff_high": d + half, "dof": dof, "p": p, "within_noise": p >= ALPHA}


# --------------------------------------------------------------------------------------
# Members, the confirmed front, noise, encodings
# --------------------------------------------------------------------------------------


def load_confirm(run: Run) -> list[dict[str, Any]]:
    """The rows of the run's confirm.parquet ([] when the run has none)."""
    rows = run.paths.rows(RunPaths.CONFIRM)
    missing = [c for c in ("trial_id", "seed", "status", "test_acc") if rows and c not in rows[0]]
    if missing:
        raise KdsearchError(
            f"{run.paths.uri}/{RunPaths.CONFIRM}: lacks the column(s) {', '.join(missing)}; "
            "it is written by `kdsearch confirm`"
        )
    return rows


def cost_columns(objectives: Pairs) -> list[str]:
    """The columns a member shows besides accuracy: the run's other objectives, then FLOPs, MACs, params."""
    acc, _ = accuracy_and_cost(objectives)
    names = [m for m, _ in objectives if m != acc] + objective_table.names("computed")
    return list(dict.fromkeys(names))


def member_stats(
    rows: Sequence[dict[str, Any]],
    trials: Sequence[dict[str, Any]] = (),
    objectives: Pairs = DEFAULT_OBJECTIVES,
) -> list[dict[str, Any]]:
    """One dict per original trial of confirm.parquet's `rows`, cheapest first (by the first
    minimized objective):

    trial_id, pos_embed, n (completed seeds), failed (failed seeds), seeds (the completed ones),
    val_acc_mean, val_acc_std, test_acc_mean, test_acc_std, test_acc_low, test_acc_high (the 95%
    Student t interval of the mean test accuracy clipped to [0, 1], `INTERVAL`; None for n = 1:
    no interval from one seed),
    search_val_acc (the trial's val_acc in `trials`, the run's trials.parquet), each cost (the
    run's other objectives, averaged over the completed seeds where they vary; FLOPs, MACs and
    params exact) and the architecture (config keys without `student.`). The formulas are in
    this module's docstring.
    """
    search = {r["trial_id"]: r for r in trials}
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_trial.setdefault(str(r["trial_id"]), []).append(r)
    costs = cost_columns(objectives)
    out = []
    for tid, group in by_trial.items():
        done = [r for r in group if r.get("status") == Status.COMPLETED and r.get("test_acc") is not None]
        original = search.get(tid, {})
        val = mean_interval([r["val_acc"] for r in done if r.get("val_acc") is not None], ACCURACY_RANGE)
        test = mean_interval([r["test_acc"] for r in done], ACCURACY_RANGE)

        def first(key: str, group=group, original=original) -> Any:
            found = next((r[key] for r in group if r.get(key) is not None), original.get(key))
            return found.item() if hasattr(found, "item") else found

        member = {
            "trial_id": tid,
            "pos_embed": first("student.pos_embed"),
            "n": test["n"],
            "failed": sum(r.get("status") == Status.FAILED for r in group),
            "seeds": sorted(int(r["seed"]) for r in done),
            "val_acc_mean": val["mean"],
            "val_acc_std": val["std"],
            "test_acc_mean": test["mean"],
            "test_acc_std": test["std"],
            "test_acc_low": test["low"],
            "test_acc_high": test["high"],
            "search_val_acc": original.get("val_acc"),
        }
        for c in costs:
            seen = [float(r[c]) for r in done if r.get(c) is not None]
            member[c] = (seen[0] if len(set(seen)) == 1 else sum(seen) / len(seen)) if seen else first(c)
        member.update({k.split(".", 1)[1]: first(k) for k in ARCH_COLUMNS if k != "student.pos_embed"})
        out.append(member)
    _, cost = accuracy_and_cost(objectives)
    return sorted(out, key=lambda m: (m.get(cost) is None, m.get(cost) or 0.0, m["trial_id"]))


def confirmed_front(members: Sequence[dict[str, Any]], objectives: Pairs = DEFAULT_OBJECTIVES) -> list[dict[str, Any]]:
    """The members no other dominates in the run's objectives with its accuracy objective replaced
    by the mean test accuracy over the seeds (members without a completed seed left out), cheapest first."""
    acc, cost = accuracy_and_cost(objectives)
    done = [m for m in members if m["n"] >= 1]
    if not done:
        return []
    points = np.array(
        [[_num(m["test_acc_mean"] if name == acc else m.get(name)) for name, _ in objectives] for m in done]
    )
    mask = non_dominated_mask(points, [mode == "max" for _, mode in objectives])
    return sorted((m for m, keep in zip(done, mask) if keep), key=lambda m: (_num(m.get(cost)), m["trial_id"]))


def front_noise(front: Sequence[dict[str, Any]], objectives: Pairs = DEFAULT_OBJECTIVES) -> list[dict[str, Any]]:
    """For each pair of neighbours on the confirmed front (cheapest first): the dearer one's mean
    test accuracy minus the cheaper one's, its 95% Welch interval, p, and whether that is within
    noise by `NOISE_RULE` (then the cheaper member is as good as the seeds can tell)."""
    _, cost = accuracy_and_cost(objectives)
    out = []
    for cheap, dear in zip(front, front[1:]):
        w = welch(dear, cheap)
        out.append(
            {
                "cheaper": cheap["trial_id"],
                "dearer": dear["trial_id"],
                f"cheaper_{cost}": cheap.get(cost),
                f"dearer_{cost}": dear.get(cost),
                **w,
                "rule": "welch p >= 0.05",
                "note": _noise_note(cheap, dear, w, cost),
            }
        )
    return out


def _noise_note(cheap: dict[str, Any], dear: dict[str, Any], w: dict[str, Any], cost: str) -> str:
    head = (
        f"{dear['trial_id']} over {cheap['trial_id']} ({_cost(cost, cheap.get(cost))} -> {_cost(cost, dear.get(cost))})"
    )
    if w["within_noise"] is None:
        return f"{head}: {_signed(w['diff'])} test accuracy; cannot tell (n = {cheap['n']} and {dear['n']}: needs 2 seeds each)"
    gap = f"{_signed(w['diff'])} test accuracy, 95% interval [{_signed(w['diff_low'])}, {_signed(w['diff_high'])}], Welch p = {w['p']:.3g}"
    if w["within_noise"]:
        return f"{head}: {gap}: within noise, the cheaper one is as good as {min(cheap['n'], dear['n'])} seeds can tell"
    return f"{head}: {gap}: a real difference"


def encoding_table(members: Sequence[dict[str, Any]], objectives: Pairs = DEFAULT_OBJECTIVES) -> list[dict[str, Any]]:
    """At every distinct cost of a confirmed member (`THRESHOLDS`), the best confirmed member of
    each encoding at or under it, best first, with its mean test accuracy and 95% interval, and
    against the best encoding there: the difference with its Welch interval and the verdict
    ("best", "within noise of X", "worse than X", or "cannot tell" below 2 seeds)."""
    _, cost = accuracy_and_cost(objectives)
    done = [m for m in members if m["n"] >= 1 and m.get(cost) is not None]
    out = []
    for limit in sorted({m[cost] for m in done}):
        encodings = dict.fromkeys(m["pos_embed"] for m in done)
        best = [m for m in (_best_under(done, pe, limit, cost) for pe in encodings) if m is not None]
        best.sort(key=lambda m: (-m["test_acc_mean"], _num(m[cost]), m["trial_id"]))
        leader = best[0]
        for m in best:
            w = welch(m, leader)
            if m is leader:
                verdict = "best"
            elif w["within_noise"] is None:
                verdict = f"cannot tell against {leader['pos_embed']} (needs 2 seeds each)"
            elif w["within_noise"]:
                verdict = f"within noise of {leader['pos_embed']}"
            else:
                verdict = f"worse than {leader['pos_embed']}"
            out.append(
                {
                    f"max_{cost}": limit,
                    "pos_embed": m["pos_embed"],
                    "trial_id": m["trial_id"],
                    cost: m[cost],
                    "n": m["n"],
                    "test_acc_mean": m["test_acc_mean"],
                    "test_acc_low": m["test_acc_low"],
                    "test_acc_high": m["test_acc_high"],
                    "vs": leader["pos_embed"],
                    **({k: None for k in w} if m is leader else w),
                    "verdict": verdict,
                }
            )
    return out


def _best_under(members: Sequence[dict[str, Any]], pe: str, limit: float, cost: str) -> dict[str, Any] | None:
    there = [
        m for m in members if m["pos_embed"] == pe and m["n"] >= 1 and m.get(cost) is not None and m[cost] <= limit
    ]
    return min(there, key=lambda m: (-m["test_acc_mean"], _num(m[cost]), m["trial_id"]), default=None)


def summarize(
    rows: Sequence[dict[str, Any]], trials: Sequence[dict[str, Any]] = (), objectives: Pairs = DEFAULT_OBJECTIVES
) -> dict[str, Any]:
    """Everything confirm.parquet says, as plain data: the members, the confirmed front, the
    noise between its neighbours and the per-encoding comparison, with the rules used.
    `seeds`: the most retrainings any member was given (completed or failed)."""
    acc, cost = accuracy_and_cost(objectives)
    members = member_stats(rows, trials, objectives)
    front = confirmed_front(members, objectives)
    on_front = {m["trial_id"] for m in front}
    for m in members:
        m["on_front"] = m["trial_id"] in on_front
    return {
        "seeds": max((len(m["seeds"]) + m["failed"] for m in members), default=0),
        "retrainings": len(rows),
        "failed": sum(r.get("status") == Status.FAILED for r in rows),
        "objectives": [["test_acc_mean" if m == acc else m, d] for m, d in objectives],
        "cost": cost,
        "level": LEVEL,
        "interval": INTERVAL,
        "noise_rule": NOISE_RULE,
        "thresholds": THRESHOLDS.format(cost=cost),
        "members": members,
        "front": front,
        "noise": front_noise(front, objectives),
        "encodings": encoding_table(members, objectives),
    }


def confirm_summary(run: Run) -> dict[str, Any]:
    """`summarize` of the run's confirm.parquet against its trials and objectives; one clear
    error when the run has not been confirmed."""
    rows = load_confirm(run)
    if not rows:
        raise KdsearchError(f"{run.paths.uri}: no {RunPaths.CONFIRM} yet; run `kdsearch confirm {run.paths.uri}` first")
    return {"run": run.name, **summarize(rows, run.trials, run.objectives)}


# --------------------------------------------------------------------------------------
# Shown
# --------------------------------------------------------------------------------------


def display_tables(summary: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The summary's three tables as strings, for the report and the CLI's table: members
    (mean +- std val, mean test with its 95% interval (`INTERVAL`, a clipped bound marked), n),
    the front's noise notes, encodings."""
    cost = summary["cost"]
    heading = objective_table.get(cost).heading
    members = [
        {
            "trial_id": m["trial_id"],
            "pos_embed": str(m["pos_embed"]),
            heading: _cost_value(cost, m.get(cost)),
            "n": f"{m['n']}" + (f" ({m['failed']} failed)" if m["failed"] else ""),
            "val acc (mean ± std)": _mean_std(m["val_acc_mean"], m["val_acc_std"]),
            f"test acc ({INTERVAL_HEADING})": _mean_interval(m),
            "search val acc": _acc(m["search_val_acc"]),
            "front": "yes" if m.get("on_front") else "",
        }
        for m in summary["members"]
    ]
    noise = [
        {
            "cheaper": r["cheaper"],
            "dearer": r["dearer"],
            "difference (dearer - cheaper)": _diff(r),
            "Welch p": "" if r["p"] is None else f"{r['p']:.3g}",
            "within noise": {None: "cannot tell", True: "yes", False: "no"}[r["within_noise"]],
        }
        for r in summary["noise"]
    ]
    encodings = [
        {
            f"{heading} at most": _cost_value(cost, r[f"max_{cost}"]),
            "pos_embed": str(r["pos_embed"]),
            "trial_id": r["trial_id"],
            heading: _cost_value(cost, r[cost]),
            "n": str(r["n"]),
            f"test acc ({INTERVAL_HEADING})": _mean_interval(
                {
                    "test_acc_mean": r["test_acc_mean"],
                    "test_acc_low": r["test_acc_low"],
                    "test_acc_high": r["test_acc_high"],
                    "n": r["n"],
                }
            ),
            "difference to the best (95% interval)": "" if r["diff"] is None else _diff(r),
            "verdict": r["verdict"],
        }
        for r in summary["encodings"]
    ]
    return {"members": members, "noise": noise, "encodings": encodings}


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _acc(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _signed(v: float | None) -> str:
    return "" if v is None else f"{v:+.4f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def _mean_interval(m: dict[str, Any]) -> str:
    if m["test_acc_mean"] is None:
        return "no completed seed"
    if m["test_acc_low"] is None:
        return f"{m['test_acc_mean']:.4f} (n = 1: no interval)"
    shown = f"{m['test_acc_mean']:.4f} [{m['test_acc_low']:.4f}, {m['test_acc_high']:.4f}]"
    return shown + (" clipped" if clipped(m["test_acc_low"], m["test_acc_high"]) else "")


def _diff(r: dict[str, Any]) -> str:
    if r["diff"] is None:
        return ""
    if r["diff_low"] is None:
        return f"{_signed(r['diff'])} (no interval)"
    return f"{_signed(r['diff'])} [{_signed(r['diff_low'])}, {_signed(r['diff_high'])}]"


def _cost_value(cost: str, v: Any) -> str:
    return objective_table.get(cost).show(v)


def _cost(cost: str, v: Any) -> str:
    o = objective_table.get(cost)
    return f"{o.show(v)} {o.heading}"
