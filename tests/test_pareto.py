"""Pareto math: tables with ties, duplicates, NaN and +-inf, and brute force on random sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsearch.results.pareto import non_dominated_mask

INF = math.inf
NAN = math.nan
MAX_MIN = [True, False]  # (val_acc max, flops min)


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], []),
        ([[0.9, 10]], [True]),
        ([[0.9, 10], [0.8, 20]], [True, False]),  # first dominates
        ([[0.9, 10], [0.95, 20]], [True, True]),  # a trade-off
        ([[0.9, 10], [0.9, 10]], [True, True]),  # duplicates: neither dominates
        ([[0.9, 10], [0.9, 20]], [True, False]),  # tie in accuracy, more FLOPs
        ([[0.9, 10], [0.8, 10]], [True, False]),  # tie in FLOPs, less accurate
        ([[0.9, INF], [0.1, 5]], [True, True]),  # +inf FLOPs is worst but the accuracy is best
        ([[0.9, 10], [0.9, INF]], [True, False]),
        ([[0.5, -INF], [0.9, 10]], [True, True]),
        ([[-INF, 1], [0.1, 1]], [False, True]),
        ([[NAN, 1], [0.1, 5]], [False, True]),  # NaN rows are never on the front...
        ([[NAN, 1], [0.1, 5], [0.05, 6]], [False, True, False]),  # ...and dominate nothing
    ],
)
def test_non_dominated_table(points, expected) -> None:
    pts = np.array(points, dtype=float).reshape(len(points), 2)
    assert non_dominated_mask(pts, MAX_MIN).tolist() == expected


def test_two_points() -> None:
    assert non_dominated_mask(np.array([[0.9, 10], [0.8, 10]]), MAX_MIN).tolist() == [True, False]
    assert non_dominated_mask(np.array([[0.9, 10], [0.9, 10]]), MAX_MIN).tolist() == [True, True]
    assert non_dominated_mask(np.array([[NAN, 10], [0.8, 20]]), MAX_MIN).tolist() == [False, True]
    assert non_dominated_mask(np.array([[1, 1, 1], [1, 1, 2]]), [False, False, False]).tolist() == [True, False]


def test_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        non_dominated_mask(np.zeros((3, 3)), MAX_MIN)


def brute_dominates(a, b, maximize) -> bool:
    """Plain Python, written apart from the module: at least as good everywhere, better somewhere."""
    better_somewhere = False
    for x, y, mx in zip(a, b, maximize):
        if math.isnan(x) or math.isnan(y):
            return False
        if (x < y) if mx else (x > y):
            return False
        if (x > y) if mx else (x < y):
            better_somewhere = True
    return better_somewhere


coords = st.one_of(st.integers(0, 4).map(float), st.sampled_from([INF, -INF]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coords, coords, coords), max_size=12), st.lists(st.booleans(), min_size=3, max_size=3))
def test_matches_brute_force(points, maximize) -> None:
    pts = np.array(points, dtype=float).reshape(len(points), 3)
    mask = non_dominated_mask(pts, maximize)
    for i, p in enumerate(points):
        expected = not any(brute_dominates(q, p, maximize) for j, q in enumerate(points) if j != i)
        assert mask[i] == expected


# ---- hypervolume --------------------------------------------------------------------------


def brute_hypervolume(points, maximize, ref) -> float:
    """Exact area of the union of the boxes [point, ref], by coordinate compression."""
    pts = [p for p in points if not any(math.isnan(v) for v in p)]
    flip = [(-1 if m else 1) for m in maximize]
    pts = [tuple(v * f for v, f in zip(p, flip)) for p in pts]
    r = tuple(v * f for v, f in zip(ref, flip))
    pts = [p for p in pts if p[0] < r[0] and p[1] < r[1]]
    xs = sorted({p[0] for p in pts} | {r[0]})
    ys = sorted({p[1] for p in pts} | {r[1]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(p[0] <= x0 and p[1] <= y0 for p in pts):
                area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize(
    "points, ref, expected",
    [
        ([], [0, 10], 0.0),
        ([[0.5, 4]], [0, 10], 3.0),  # (0.5 - 0) x (10 - 4)
        ([[0.5, 4], [0.5, 4]], [0, 10], 3.0),  # duplicates count once
        ([[0.5, 4], [0.8, 8]], [0, 10], 3.0 + 0.3 * 2),
        ([[0.5, 4], [0.4, 6]], [0, 10], 3.0),  # a dominated point adds nothing
        ([[0.5, 12]], [0, 10], 0.0),  # beyond the reference: nothing
        ([[0.0, 4]], [0, 10], 0.0),  # on the reference: nothing
        ([[NAN, 4], [0.5, 4]], [0, 10], 3.0),
    ],
)
def test_hypervolume_table(points, ref, expected) -> None:
    from kdsearch.results.pareto import hypervolume_2d

    assert hypervolume_2d(np.array(points, dtype=float).reshape(-1, 2), MAX_MIN, ref) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10).map(float), st.integers(0, 10).map(float)), max_size=10),
    st.lists(st.booleans(), min_size=2, max_size=2),
)
def test_hypervolume_matches_brute_force(points, maximize) -> None:
    from kdsearch.results.pareto import hypervolume_2d

    ref = [(-1.0 if m else 11.0) for m in maximize]  # worse than every point
    got = hypervolume_2d(np.array(points, dtype=float).reshape(-1, 2), maximize, ref)
    assert got == pytest.approx(brute_hypervolume(points, maximize, ref))


def test_normalized_hypervolume_and_history() -> None:
    from kdsearch.results.pareto import hypervolume_history, normalized_hypervolume

    acc, flops = np.array([0.5, 0.4, 0.9]), np.array([20.0, 40.0, 80.0])
    ref = 1.1 * 80
    assert normalized_hypervolume(acc, flops, ref) == pytest.approx(
        brute_hypervolume([(a, f / ref) for a, f in zip(acc, flops)], MAX_MIN, [0, 1])
    )
    hist = hypervolume_history(acc, flops, ref)
    assert hist[0] == pytest.approx(0.5 * (1 - 20 / 88)) and hist[1] == hist[0] and hist[2] > hist[1]
    assert 0 <= hist[-1] <= 1
