"""Pareto math: tables with ties, duplicates, NaN and +-inf, and brute force on random sets;
the hypervolume in any number of objectives, its reference point and how every view shows it."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
import yaml
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
    """Exact volume of the union of the boxes [point, ref] in any dimension, by coordinate
    compression: each grid cell counts when some point dominates its lower corner."""
    flip = [(-1 if m else 1) for m in maximize]
    pts = [tuple(v * f for v, f in zip(p, flip)) for p in points if not any(math.isnan(v) for v in p)]
    r = tuple(v * f for v, f in zip(ref, flip))
    pts = [p for p in pts if all(a <= b for a, b in zip(p, r))]
    axes = [sorted({p[k] for p in pts} | {r[k]}) for k in range(len(r))]
    volume = 0.0
    for cell in itertools.product(*(list(zip(ax, ax[1:])) for ax in axes)):
        if any(all(p[k] <= lo for k, (lo, _) in enumerate(cell)) for p in pts):
            volume += math.prod(hi - lo for lo, hi in cell)
    return volume


def test_optunas_private_hypervolume_is_pinned() -> None:
    """What kdsearch relies on in optuna._hypervolume.compute_hypervolume (a private module):
    it minimizes, counts duplicates once, gives 0 for no points and refuses a point beyond the
    reference (kdsearch.results.pareto.hypervolume drops those first)."""
    from optuna._hypervolume import compute_hypervolume

    ref2, ref3 = np.array([4.0, 4.0]), np.array([4.0, 4.0, 4.0])
    assert compute_hypervolume(np.array([[1.0, 3.0], [3.0, 1.0]]), ref2) == pytest.approx(5.0)
    assert compute_hypervolume(np.array([[1.0, 3.0], [1.0, 3.0], [3.0, 1.0]]), ref2) == pytest.approx(5.0)
    assert compute_hypervolume(np.array([[2.0, 2.0, 2.0], [3.0, 3.0, 1.0]]), ref3) == pytest.approx(8.0 + 1.0 * 1 * 1)
    assert compute_hypervolume(np.zeros((0, 3)), ref3) == 0.0
    with pytest.raises(ValueError, match="dominate or equal the reference"):
        compute_hypervolume(np.array([[5.0, 1.0]]), ref2)


@pytest.mark.parametrize(
    "points, maximize, ref, expected",
    [
        # 2-D, accuracy max and cost min, worked by hand
        ([], MAX_MIN, [0, 10], 0.0),
        ([[0.5, 4]], MAX_MIN, [0, 10], 3.0),  # one point: (0.5 - 0) x (10 - 4)
        ([[0.5, 4], [0.5, 4]], MAX_MIN, [0, 10], 3.0),  # duplicates count once
        ([[0.5, 4], [0.8, 8]], MAX_MIN, [0, 10], 3.0 + 0.3 * 2),
        ([[0.5, 4], [0.4, 6]], MAX_MIN, [0, 10], 3.0),  # a dominated point adds nothing
        ([[0.5, 12]], MAX_MIN, [0, 10], 0.0),  # beyond the reference: nothing
        ([[0.5, 12], [0.5, 4]], MAX_MIN, [0, 10], 3.0),  # ...and takes nothing away
        ([[0.0, 4]], MAX_MIN, [0, 10], 0.0),  # on the reference: nothing
        ([[NAN, 4], [0.5, 4]], MAX_MIN, [0, 10], 3.0),
        # 3-D: accuracy max, two costs min
        ([[0.5, 2, 2]], [True, False, False], [0, 4, 4], 0.5 * 2 * 2),
        ([[0.5, 2, 2], [0.5, 2, 2]], [True, False, False], [0, 4, 4], 2.0),  # duplicates
        # two boxes 0.5x2x2 and 1x1x3 overlapping in 0.5x1x2: 2 + 3 - 1
        ([[0.5, 2, 2], [1.0, 3, 1]], [True, False, False], [0, 4, 4], 4.0),
        ([[0.5, 2, 2], [0.4, 3, 3]], [True, False, False], [0, 4, 4], 2.0),  # dominated
        ([[0.5, 2, 5], [0.5, 2, 2]], [True, False, False], [0, 4, 4], 2.0),  # beyond in one objective
        ([[1, 1, 1], [0, 2, 2]], [False, False, False], [2, 2, 2], 1.0),  # a point on the reference adds nothing
        # 4-D goes through WFG proper
        ([[1, 1, 1, 1], [0, 1, 1, 1]], [False] * 4, [2, 2, 2, 2], 2.0),
        ([[1.0], [0.5]], [False], [2.0], 1.5),  # one objective: the best distance to the reference
    ],
)
def test_hypervolume_table(points, maximize, ref, expected) -> None:
    from kdsearch.results.pareto import hypervolume

    assert hypervolume(np.array(points, dtype=float), maximize, ref) == pytest.approx(expected)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 3).flatmap(
        lambda m: st.tuples(
            st.lists(st.tuples(*[st.integers(0, 6).map(float)] * m), max_size=8),
            st.lists(st.booleans(), min_size=m, max_size=m),
            st.lists(st.integers(1, 5).map(float), min_size=m, max_size=m),
        )
    )
)
def test_hypervolume_matches_brute_force(case) -> None:
    """Random sets in 2 and 3 objectives, with ties, duplicates and points beyond the reference."""
    from kdsearch.results.pareto import hypervolume

    points, maximize, ref = case
    got = hypervolume(np.array(points, dtype=float).reshape(-1, len(ref)), maximize, ref)
    assert got == pytest.approx(brute_hypervolume(points, maximize, ref))


def test_normalized_hypervolume_is_the_share_of_the_box() -> None:
    from kdsearch.results.pareto import hypervolume_history, normalized_hypervolume

    maximize, ref, ideal = [True, False, False], [0.0, 200.0, 1000.0], [1.0, 0.0, 0.0]
    pts = np.array([[0.5, 100.0, 500.0], [0.8, 150.0, 250.0], [0.9, 300.0, 10.0]])  # the last: beyond on FLOPs
    # in the unit box: (0.5, 0.5, 0.5) and (0.2, 0.75, 0.25): 0.125 + 0.8 x 0.25 x 0.75 - 0.5 x 0.25 x 0.5
    expected = 0.125 + 0.15 - 0.0625
    assert normalized_hypervolume(pts, maximize, ref, ideal) == pytest.approx(expected)
    assert hypervolume_history(pts, maximize, ref, ideal) == pytest.approx([0.125, expected, expected])
    assert normalized_hypervolume(np.array([[1.0, 0.0, 0.0]]), maximize, ref, ideal) == pytest.approx(1.0)
    assert (
        normalized_hypervolume(np.array([[1.0, -5.0, 0.0]]), maximize, ref, ideal) == 1.0
    )  # past the ideal: the ideal
    assert normalized_hypervolume(np.zeros((0, 3)), maximize, ref, ideal) == 0.0
    with pytest.raises(ValueError, match="worse than the ideal"):
        normalized_hypervolume(pts, maximize, [1.0, 200.0, 1000.0], ideal)


# ---- the reference point ------------------------------------------------------------------

SPACE = {
    "data": {"name": "digits", "img_size": 16},
    "student": {
        "embed_dim": [16, 32, 48],
        "depth": [1, 3],
        "num_heads": [2, 4],
        "mlp_ratio": {"low": 1.0, "high": 3.0},
        "patch_size": [2, 4, 8],
        "pos_embed": ["learned", "relpos", "cpe", "none"],
        "distill_token": [False, True],
    },
    "recipe": {"alpha": 0.0},
}


def enumerated_max(space, name: str) -> float:
    from kdsearch.space import objectives

    return max(objectives.get(name).compute(s) for s in space.architectures())


@pytest.mark.parametrize(
    "student",
    [
        SPACE["student"],
        {**SPACE["student"], "embed_dim": None, "head_dim": [8, 16], "num_heads": [1, 3]},  # width = head_dim x heads
        {**SPACE["student"], "depth": {"low": 1, "high": 4}, "num_heads": 2, "patch_size": [1, 16]},
    ],
)
def test_the_largest_cost_is_the_exact_maximum_over_the_space(student) -> None:
    from kdsearch.space.file import parse_space

    space = parse_space({**SPACE, "student": {k: v for k, v in student.items() if v is not None}})
    for name in ("flops", "macs", "params"):
        assert space.largest(name) == enumerated_max(space, name)
    assert space.largest("val_acc") is None  # trained, not computed


def test_the_reference_comes_from_the_budget_the_space_or_the_file(tmp_path) -> None:
    from kdsearch.space.file import parse_space

    objectives = {"val_acc": "max", "flops": "min", "params": "min", "macs": "min"}
    open_space = parse_space({**SPACE, "objectives": objectives})
    assert open_space.reference_point() == {
        "val_acc": 0.0,  # its worst
        "flops": enumerated_max(open_space, "flops"),  # no budget: the space's largest
        "params": enumerated_max(open_space, "params"),
        "macs": enumerated_max(open_space, "macs"),
    }
    budget = parse_space({**SPACE, "objectives": objectives, "budget": {"max_gflops": 0.001, "max_params": 90_000}})
    assert budget.reference_point() == {
        "val_acc": 0.0,
        "flops": 1e6,
        "params": 90_000.0,
        "macs": enumerated_max(budget, "macs"),
    }
    stated = parse_space(
        {**SPACE, "objectives": objectives, "hypervolume": {"reference": {"val_acc": 0.1, "flops": 2.0e8}}}
    )
    assert stated.reference_point()["val_acc"] == 0.1 and stated.reference_point()["flops"] == 2.0e8
    assert stated.reference_point([("params", "min")]) == {"params": enumerated_max(stated, "params")}


@pytest.fixture()
def latency():
    """A measured objective of the table, with no budget and no largest value: it has no
    reference unless stated."""
    from kdsearch.space import objectives

    latency = objectives.OBJECTIVES["latency_ms"]
    assert latency.source == "measured"
    return latency


def test_an_objective_without_a_reference_has_no_hypervolume_and_says_why(latency, tmp_path) -> None:
    from kdsearch.results.hypervolume import hypervolume_of, run_reference
    from kdsearch.results.tables import RunPaths, write_json
    from kdsearch.space.file import parse_space

    raw = {**SPACE, "objectives": {"val_acc": "max", "latency_ms": "min"}}
    assert parse_space(raw).reference_point() == {"val_acc": 0.0}
    paths = RunPaths.at(tmp_path)
    paths.store.write_text(RunPaths.SPACE, yaml.safe_dump(raw))
    meta = {"objectives": [["val_acc", "max"], ["latency_ms", "min"]], "hypervolume_reference": {"val_acc": 0.0}}
    write_json(paths.store, RunPaths.META, meta)
    reference, why = run_reference(paths, meta, [("val_acc", "max"), ("latency_ms", "min")])
    assert reference == {"val_acc": 0.0}
    assert "no reference point for latency_ms" in why and "hypervolume: {reference: {latency_ms: VALUE}}" in why
    rows = [{"trial_id": "a", "status": "completed", "val_acc": 0.5, "latency_ms": 2.0, "finished_at": 1.0}]
    hv = hypervolume_of(rows, [("val_acc", "max"), ("latency_ms", "min")], reference, why_no_reference=why)
    assert hv.value is None and hv.describe() == f"hypervolume: none ({why})"
    stated = parse_space({**raw, "hypervolume": {"reference": {"latency_ms": 4.0}}}).reference_point()
    assert stated == {"val_acc": 0.0, "latency_ms": 4.0}
    hv = hypervolume_of(rows, [("val_acc", "max"), ("latency_ms", "min")], stated)
    assert hv.value == pytest.approx(0.5 * 0.5)
    assert hv.describe() == (
        "hypervolume 0.2500 of the box from the reference (val_acc 0, latency_ms 4) to the ideal (val_acc 1, latency_ms 0)"
    )


@pytest.mark.parametrize(
    "section, message",
    [
        ([1], "hypervolume: must be a mapping holding reference: {metric: value}, got a list"),
        ({"referense": {}}, "hypervolume.referense: unknown key (did you mean reference?); allowed: reference"),
        ({"reference": 0.5}, "hypervolume.reference: must be a mapping of metric: value"),
        ({"reference": {"latency": 1}}, "hypervolume.reference.latency: unknown metric; allowed: val_acc, flops"),
        ({"reference": {"flops": "big"}}, "hypervolume.reference.flops: must be a finite number, got 'big'"),
        ({"reference": {"flops": 0}}, "hypervolume.reference.flops: must be above the ideal 0 of the minimized flops"),
        ({"reference": {"val_acc": 1}}, "hypervolume.reference.val_acc: must be below the ideal 1 of the maximized"),
    ],
)
def test_a_bad_reference_is_one_line(section, message) -> None:
    from kdsearch.errors import SpaceError
    from kdsearch.space.file import parse_space

    with pytest.raises(SpaceError) as e:
        parse_space({**SPACE, "hypervolume": section}, source="s.yaml")
    assert str(e.value).startswith(f"s.yaml: {message}") and "\n" not in str(e.value)


# ---- a run's hypervolume, as every view shows it -------------------------------------------


def test_every_view_reads_the_runs_reference(tmp_path, capsys) -> None:
    """run.json's reference wins over the space's (a run keeps the point it started with);
    a run.json without one falls back to the run's space.yaml; pareto, status and
    the report say the same value."""
    from kdsearch.results.report import hypervolume
    from kdsearch.results.tables import RunPaths, load_run, write_json, write_table
    from tests.helpers import run_cli

    raw = {**SPACE, "objectives": {"val_acc": "max", "flops": "min", "params": "min"}, "budget": {"max_gflops": 0.001}}
    paths = RunPaths.at(tmp_path / "run")
    paths.store.write_text(RunPaths.SPACE, yaml.safe_dump(raw))
    rows = [
        {
            "trial_id": "a",
            "status": "completed",
            "val_acc": 0.6,
            "flops": 4e5,
            "params": 2e4,
            "macs": 2e5,
            "finished_at": 11.0,
        },
        {
            "trial_id": "b",
            "status": "completed",
            "val_acc": 0.9,
            "flops": 8e5,
            "params": 4e4,
            "macs": 4e5,
            "finished_at": 12.0,
        },
        {"trial_id": "c", "status": "infeasible", "val_acc": None, "flops": 5e6, "params": 9e4, "finished_at": 13.0},
    ]
    write_table(rows, paths.store, RunPaths.TRIALS, ("trial_id",))
    meta = {"name": "run", "objectives": [["val_acc", "max"], ["flops", "min"], ["params", "min"]], "trials": 3}
    write_json(paths.store, RunPaths.META, {**meta, "started": 10.0})  # a run.json without a reference

    from kdsearch.space.file import parse_space

    space_ref = parse_space(raw).reference_point()
    assert space_ref["flops"] == 1e6
    pts = np.array([[r["val_acc"], r["flops"], r["params"]] for r in rows[:2]])
    ref = [0.0, 1e6, space_ref["params"]]
    expected = brute_hypervolume(
        [(1 - a, f / ref[1], p / ref[2]) for a, f, p in pts], [False] * 3, [1.0, 1.0, 1.0]
    )  # the unit box, by brute force
    hv = hypervolume(load_run(paths.uri))
    assert hv.value == pytest.approx(expected) and hv.reference == dict(zip(("val_acc", "flops", "params"), ref))
    assert [h["trial_id"] for h in hv.by_trial] == ["a", "b"] and [h["seconds"] for h in hv.by_trial] == [1.0, 2.0]

    # run.json's reference, once written, is what every reader uses
    fixed = {"val_acc": 0.0, "flops": 2e6, "params": 1e5}
    write_json(paths.store, RunPaths.META, {**meta, "started": 10.0, "hypervolume_reference": fixed})
    expected = brute_hypervolume([(1 - a, f / 2e6, p / 1e5) for a, f, p in pts], [False] * 3, [1.0, 1.0, 1.0])
    assert hypervolume(load_run(paths.uri)).value == pytest.approx(expected)
    assert run_cli(["pareto", paths.uri, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)["hypervolume"]
    assert out["value"] == pytest.approx(expected) and out["reference"] == fixed and out["normalized"] is True
    assert out["ideal"] == {"val_acc": 1.0, "flops": 0.0, "params": 0.0}
    assert run_cli(["status", paths.uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hypervolume"]["value"] == pytest.approx(expected)
    assert run_cli(["status", paths.uri]) == 0
    line = f"hypervolume {expected:.4f} of the box from the reference (val_acc 0, flops 2e6, params 1e5) to the ideal"
    assert line in capsys.readouterr().out.replace("\n", " ")
    assert run_cli(["pareto", paths.uri]) == 0
    assert line in capsys.readouterr().out.replace("\n", " ")
    # --objectives beyond the run's own: the space's reference for them
    assert run_cli(["pareto", paths.uri, "--objectives", "val_acc,macs", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)["hypervolume"]
    assert out["reference"] == {"val_acc": 0.0, "macs": parse_space(raw).largest("macs")}


def test_the_live_view_draws_the_runs_hypervolume(tmp_path) -> None:
    """LiveView (what a search draws on its console) measures against run.json's reference."""
    import io

    from rich.console import Console

    from kdsearch.results.tables import RunPaths, write_json, write_table
    from kdsearch.search.callbacks import LiveView, ResultsRecorder
    from kdsearch.space.file import parse_space

    raw = {**SPACE, "budget": {"max_gflops": 0.001}}
    paths = RunPaths.at(tmp_path / "run")
    paths.store.write_text(RunPaths.SPACE, yaml.safe_dump(raw))
    row = {"trial_id": "a", "status": "completed", "val_acc": 0.5, "flops": 5e5, "finished_at": 1.0}
    write_table([row], paths.store, RunPaths.TRIALS, ("trial_id",))
    meta = {"objectives": [["val_acc", "max"], ["flops", "min"]], "started": 0.0, "trials": 4}
    write_json(paths.store, RunPaths.META, {**meta, "hypervolume_reference": {"val_acc": 0.0, "flops": 2e6}})
    recorder = ResultsRecorder(paths, searcher=None)
    recorder.setup()
    out = io.StringIO()
    view = LiveView(recorder, parse_space(raw), 4, 0.0, Console(file=out, width=160))
    view.setup()
    view.on_experiment_end([])
    expected = 0.5 * (1 - 5e5 / 2e6)  # run.json's 2e6, not the space's budget 1e6
    assert f"hypervolume {expected:.4f} of the box from the reference (val_acc 0, flops 2e6)" in out.getvalue()


def test_the_front_sweep_agrees_with_the_pairwise_definition() -> None:
    """non_dominated_mask (a sweep in 2-D, a pass against the front in more) against every pair
    compared, on small integer grids full of ties, duplicates, NaN and infinities."""
    from kdsearch.results.pareto import hypervolume_history, non_dominated_mask, normalized_hypervolume

    def pairwise(points: np.ndarray, maximize: list[bool]) -> np.ndarray:
        pts = np.where(maximize, -points, points)  # every objective minimized
        valid = ~np.isnan(pts).any(axis=1)
        mask, v = valid.copy(), pts[valid]
        if len(v):
            le = np.all(v[:, None, :] <= v[None, :, :], axis=2)
            lt = np.any(v[:, None, :] < v[None, :, :], axis=2)
            mask[np.flatnonzero(valid)] = ~np.any(le & lt, axis=0)
        return mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        m, n = int(rng.integers(2, 4)), int(rng.integers(0, 30))
        pts = rng.integers(0, 4, size=(n, m)).astype(float)
        for value in (np.nan, np.inf, -np.inf):
            pts[rng.random(n) < 0.1, int(rng.integers(m))] = value
        maximize = [bool(b) for b in rng.random(m) < 0.5]
        assert (non_dominated_mask(pts, maximize) == pairwise(pts, maximize)).all(), (pts, maximize)
        # the incremental history equals the value recomputed from scratch after each point
        unit = rng.random((n, m))
        reference = [0.0 if mx else 1.0 for mx in maximize]
        ideal = [1.0 if mx else 0.0 for mx in maximize]
        scratch = [normalized_hypervolume(unit[: i + 1], maximize, reference, ideal) for i in range(n)]
        assert np.allclose(hypervolume_history(unit, maximize, reference, ideal), scratch)


def test_the_front_of_10000_trials_takes_milliseconds() -> None:
    from kdsearch.results.pareto import non_dominated_mask

    pts = np.random.default_rng(1).random((10_000, 2))
    t0 = time.perf_counter()
    mask = non_dominated_mask(pts, [True, False])
    assert time.perf_counter() - t0 < 0.5  # comparing every pair takes seconds at this size
    assert 1 <= mask.sum() < 100
