"""Pareto math: tables with ties, duplicates, NaN and +-inf, and brute force on random sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsearch.pareto import dominates, non_dominated_mask

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


def test_dominates() -> None:
    assert dominates([0.9, 10], [0.8, 10], MAX_MIN)
    assert not dominates([0.9, 10], [0.9, 10], MAX_MIN)
    assert not dominates([NAN, 10], [0.8, 20], MAX_MIN)
    assert dominates([1, 1, 1], [1, 1, 2], [False, False, False])


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
        assert all(dominates(q, p, maximize) == brute_dominates(q, p, maximize) for q in points)
        assert mask[i] == expected
