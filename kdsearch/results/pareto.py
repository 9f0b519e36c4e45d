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
    """Boolean mask of the rows no other row dominates (NaN rows are False)."""
    pts = _as_min(points, maximize)
    n = len(pts)
    valid = ~np.isnan(pts).any(axis=1)
    mask = valid.copy()
    v = pts[valid]
    if len(v):
        # le[i, j]: row i is <= row j everywhere; lt: strictly less somewhere
        le = np.all(v[:, None, :] <= v[None, :, :], axis=2)
        lt = np.any(v[:, None, :] < v[None, :, :], axis=2)
        dominated = np.any(le & lt, axis=0)
        mask[np.flatnonzero(valid)] = ~dominated
    return mask if n else np.zeros(0, dtype=bool)


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


def hypervolume_2d(points: np.ndarray, maximize: Sequence[bool], reference: Sequence[float]) -> float:
    """Area dominated by `points` and bounded by `reference` (2 objectives, any max/min mix).

    Points no better than the reference in both objectives add nothing; NaN rows are ignored.
    """
    if len(maximize) != 2:
        raise ValueError("hypervolume_2d takes exactly two objectives")
    pts = _as_min(np.asarray(points, dtype=float).reshape(-1, 2), maximize)
    ref = _as_min(np.asarray([reference], dtype=float), maximize)[0]
    pts = pts[~np.isnan(pts).any(axis=1)]
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]  # by first objective, then second
    area, best_second = 0.0, ref[1]
    for x, y in pts:
        if y < best_second:
            area += (ref[0] - x) * (best_second - y)
            best_second = y
    return float(area)


def normalized_hypervolume(acc: np.ndarray, cost: np.ndarray, cost_ref: float) -> float:
    """Hypervolume of (accuracy max, cost min) in the unit box: accuracy from the reference 0,
    cost divided by `cost_ref` (kdsearch's default: 1.1 x the largest cost seen). In [0, 1]."""
    if cost_ref <= 0 or not np.isfinite(cost_ref):
        return 0.0
    pts = np.column_stack([np.asarray(acc, dtype=float), np.asarray(cost, dtype=float) / cost_ref])
    return hypervolume_2d(pts, [True, False], [0.0, 1.0])


def hypervolume_history(acc: np.ndarray, cost: np.ndarray, cost_ref: float) -> np.ndarray:
    """Normalized hypervolume after each point, in the order given (e.g. trials by finish time)."""
    acc, cost = np.asarray(acc, dtype=float), np.asarray(cost, dtype=float)
    return np.array([normalized_hypervolume(acc[: i + 1], cost[: i + 1], cost_ref) for i in range(len(acc))])
