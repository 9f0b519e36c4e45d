"""Pareto math as small numpy functions (in the manner of optuna/study/_multi_objective.py).

Points are rows of a (n, m) array; `maximize` says, per column, whether larger is better.
Conventions, pinned down by tests/test_pareto.py:
- a dominates b when a is at least as good in every objective and strictly better in one;
- duplicates do not dominate each other: equal points are all on the front;
- a row holding NaN is never on the front and dominates nothing;
- +-inf are ordinary values (+inf FLOPs is as bad as it gets, -inf as good).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdsearch.results.outcomes import Status
from kdsearch.space.objectives import Pairs, accuracy_and_cost


def _as_min(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(maximize):
        raise ValueError(f"points must be (n, {len(maximize)}), got {pts.shape}")
    return np.where(np.asarray(maximize, dtype=bool), -pts, pts)


def non_dominated_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (NaN rows are False).

    O(n log n) in two objectives (a sweep), and in more O(n f) with f the front's size: the
    rows sorted lexicographically (every row that dominates another sorts before it), each
    checked against the front found so far only, never every pair (O(n^2)): 10,000 rows take
    milliseconds (tests/test_pareto.py holds it to the pairwise definition and to that time)."""
    pts = _as_min(points, maximize)
    mask = np.zeros(len(pts), dtype=bool)
    valid = np.flatnonzero(~np.isnan(pts).any(axis=1))
    if len(valid):
        v = pts[valid]
        mask[valid] = _sweep_2d(v) if v.shape[1] == 2 else _front_nd(v)
    return mask


def _sweep_2d(v: np.ndarray) -> np.ndarray:
    """Minimizing both: sorted by (x, y), a row is dominated when a row before it that is not
    equal to it has y <= its y (its x is then <= too); equal rows are all kept."""
    order = np.lexsort((v[:, 1], v[:, 0]))
    s = v[order]
    new_group = np.ones(len(s), dtype=bool)
    new_group[1:] = np.any(s[1:] != s[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(s)), 0))
    running_min = np.minimum.accumulate(s[:, 1])
    before = np.full(len(s), np.inf)  # the smallest y among the rows before each row's group
    has_before = group_start > 0
    before[has_before] = running_min[group_start[has_before] - 1]
    keep = ~(has_before & (before <= s[:, 1]))
    out = np.empty(len(s), dtype=bool)
    out[order] = keep
    return out


def _front_nd(v: np.ndarray) -> np.ndarray:
    order = np.lexsort(v.T[::-1])
    front = np.empty((0, v.shape[1]))
    keep = np.zeros(len(v), dtype=bool)
    for i in order:
        p = v[i]
        if len(front) and np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1)):
            continue
        keep[i] = True
        front = np.vstack([front, p])  # nothing sorted after p dominates p: its place is final
    return keep


def front_rows(trials: Sequence[dict[str, Any]], objectives: Pairs) -> list[dict[str, Any]]:
    """The completed trials (rows of trials.parquet) no other completed trial dominates in
    `objectives`, cheapest first (by the first minimized objective)."""
    done = [
        r for r in trials if r.get("status") == Status.COMPLETED and all(r.get(m) is not None for m, _ in objectives)
    ]
    if not done:
        return []
    points = np.array([[float(r[m]) for m, _ in objectives] for r in done])
    mask = non_dominated_mask(points, [mode == "max" for _, mode in objectives])
    _, cost = accuracy_and_cost(objectives)
    return sorted((r for r, keep in zip(done, mask) if keep), key=lambda r: (r[cost], r["trial_id"]))


def hypervolume(points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Volume dominated by `points` and bounded by `reference`, in any number of objectives.

    Optuna's exact WFG (2-D and 3-D by sweeps) does the work: `optuna._hypervolume.compute_hypervolume`,
    a private module of Optuna (5.0 here), so tests/test_pareto.py pins what it returns. It
    minimizes and refuses a point beyond the reference; here maximized columns are flipped, and
    NaN rows and rows beyond the reference in any objective (their box is empty) are dropped
    first. Duplicates count once.
    """
    from optuna._hypervolume import compute_hypervolume

    ref = _as_min(np.asarray([reference], dtype=float), maximize)[0]
    pts = _as_min(np.asarray(points, dtype=float).reshape(-1, len(maximize)), maximize)
    pts = pts[~np.isnan(pts).any(axis=1) & (pts <= ref).all(axis=1)]
    return float(compute_hypervolume(pts, ref)) if len(pts) else 0.0


def normalized_hypervolume(
    points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float], ideal: Sequence[float]
) -> float:
    """The fraction of the box from `reference` to `ideal` that `points` dominate, in [0, 1].

    Each objective is scaled to 0 at its ideal and 1 at its reference (accuracy: 1 - acc; a cost
    with ideal 0: cost / reference), then `hypervolume` against (1, ..., 1). A value better than
    the ideal counts as the ideal; a point beyond the reference in any objective adds nothing.
    """
    lo = _as_min(np.asarray([ideal], dtype=float), maximize)[0]
    hi = _as_min(np.asarray([reference], dtype=float), maximize)[0]
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise ValueError(f"the reference {list(reference)} must be worse than the ideal {list(ideal)} everywhere")
    pts = _as_min(np.asarray(points, dtype=float).reshape(-1, len(maximize)), maximize)
    scaled = np.maximum((pts - lo) / (hi - lo), 0.0)  # NaN stays NaN and is dropped
    return hypervolume(scaled, [False] * len(maximize), [1.0] * len(maximize))


def hypervolume_history(
    points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float], ideal: Sequence[float]
) -> np.ndarray:
    """Normalized hypervolume after each point, in the order given (e.g. trials by finish time).

    Incremental: the front so far is kept, a point it dominates (or one beyond the reference,
    or a NaN) leaves the value as it was, and only a point that enters the front costs a
    hypervolume, of the front alone."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(maximize))
    lo = _as_min(np.asarray([ideal], dtype=float), maximize)[0]
    hi = _as_min(np.asarray([reference], dtype=float), maximize)[0]
    normalized_hypervolume(np.empty((0, len(maximize))), maximize, reference, ideal)  # checks the box
    scaled = np.maximum((_as_min(pts, maximize) - lo) / (hi - lo), 0.0)
    ones = np.ones(len(maximize))
    front = np.empty((0, len(maximize)))
    value, out = 0.0, np.empty(len(pts))
    for i, p in enumerate(scaled):
        if not (np.isnan(p).any() or (p > ones).any()):
            if not len(front) or not np.any(np.all(front <= p, axis=1)):  # not weakly dominated: it adds volume
                front = np.vstack([front[~np.all(p <= front, axis=1)], p])
                value = hypervolume(front, [False] * len(maximize), list(ones))
        out[i] = value
    return out
