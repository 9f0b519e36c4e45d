"""Pareto math as small numpy functions (in the manner of optuna/study/_multi_objective.py).

Points are rows of a (n, m) array; `maximize` says, per column, whether larger is better.
Conventions, pinned down by tests/test_pareto.py:
- a dominates b when a is at least as good in every objective and strictly better in one;
- duplicates do not dominate each other: equal points are all on the front;
- a row holding NaN is never on the front and dominates nothing;
- +-inf are ordinary values (+inf FLOPs is as bad as it gets, -inf as good).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_min(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(maximize):
        raise ValueError(f"points must be (n, {len(maximize)}), got {pts.shape}")
    return np.where(np.asarray(maximize, dtype=bool), -pts, pts)


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """Does point a dominate point b?"""
    pa, pb = _as_min(np.asarray([a, b]), maximize)
    if np.isnan(pa).any() or np.isnan(pb).any():
        return False
    return bool(np.all(pa <= pb) and np.any(pa < pb))


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
