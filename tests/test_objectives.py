"""The tables every part reads: objectives, trial outcomes, samplers, datasets, the teacher's
source. A made-up objective, registered here and nowhere in kdsearch, flows through a real
search into every table, view and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from kdsearch.errors import SpaceError
from kdsearch.results.outcomes import OPTUNA_STATE, STATUSES, Status, counts, status_of
from kdsearch.results.pareto import non_dominated_mask
from kdsearch.space import objectives
from kdsearch.space.datasets import DATASETS
from kdsearch.space.file import PLAIN, load_space, parse_space
from kdsearch.space.objectives import Objective
from kdsearch.space.samplers import SAMPLERS, make_sampler
from kdsearch.space.search_space import SearchSettings
from kdsearch.space.specs import RecipeSpec, StudentSpec, TeacherSource, teacher_source
from tests.helpers import run_cli, run_dir, write_space
from tests.test_pareto import brute_hypervolume

# --------------------------------------------------------------------------- the tables


def test_computed_objectives_are_the_exact_counts() -> None:
    from kdsearch.space.flops import count_flops

    spec = StudentSpec()
    fc = count_flops(spec)
    assert objectives.computed(spec) == {"flops": fc.flops, "macs": fc.macs, "params": fc.params}
    assert objectives.names("trained") == ["val_acc"]
    assert objectives.get("flops").show(21_000_000) == "21.000" and objectives.get("flops").heading == "MFLOPs"
    assert objectives.get("not_in_the_table").source == "trained"  # a run recorded elsewhere still reads


def test_register_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="mode must be max or min"):
        objectives.register(Objective("x", "up", "", ""))
    with pytest.raises(ValueError, match="compute or measure, not both"):
        objectives.register(Objective("x", "min", "", "", compute=len, measure=len))
    with pytest.raises(ValueError, match="already registered"):
        objectives.register(Objective("flops", "max", "", ""))
    assert "x" not in objectives.OBJECTIVES


def test_never_measured_values_are_the_worst() -> None:
    pairs = [("val_acc", "max"), ("flops", "min"), ("made_up", "min"), ("other", "max")]
    assert objectives.values_for_sampler({"flops": 7}, pairs) == [0.0, 7.0, math.inf, -math.inf]


@pytest.mark.parametrize(
    ("infeasible", "last", "errored", "expected"),
    [
        (False, {"epoch": 5}, False, Status.COMPLETED),
        (False, {"epoch": 6}, False, Status.COMPLETED),
        (False, {"epoch": 2}, False, Status.STOPPED_EARLY),
        (True, {"epoch": 0}, False, Status.INFEASIBLE),
        (False, {"epoch": 3}, True, Status.FAILED),
        (True, None, True, Status.FAILED),
        (False, None, False, Status.FAILED),
        (False, {}, False, Status.FAILED),
    ],
)
def test_status_of(infeasible: bool, last: dict | None, errored: bool, expected: Status) -> None:
    assert status_of(infeasible, 5, last, errored) is expected


def test_every_status_has_an_optuna_state() -> None:
    assert set(OPTUNA_STATE) == set(Status)
    assert all(state in optuna.trial.TrialState.__members__ for state in OPTUNA_STATE.values())
    assert [s.measured for s in Status] == [True, True, False, False]
    assert counts(["completed", "failed", "completed"]) == {
        "completed": 2,
        "stopped_early": 0,
        "infeasible": 0,
        "failed": 1,
    }
    assert STATUSES == ("completed", "stopped_early", "infeasible", "failed")


def test_every_sampler_the_space_allows_has_a_constructor() -> None:
    allowed = PLAIN["search"]["sampler"]
    assert all(allowed.check(name) for name in SAMPLERS)
    assert not allowed.check("cmaes")
    for name in SAMPLERS:
        assert isinstance(make_sampler(SearchSettings(sampler=name, trials=12)), optuna.samplers.BaseSampler)


def test_every_dataset_has_its_loaders_and_every_loader_a_dataset() -> None:
    from kdsearch.train.data import LOADERS

    assert list(LOADERS) == list(DATASETS)
    for info in DATASETS.values():
        assert info.in_chans in (1, 3)


@pytest.mark.parametrize(
    ("recipe", "live", "expected"),
    [
        (RecipeSpec(alpha=0.0), False, TeacherSource.NONE),
        (RecipeSpec(alpha=0.0), True, TeacherSource.NONE),
        (RecipeSpec(alpha=0.5), False, TeacherSource.CACHED),
        (RecipeSpec(alpha=0.0, hard_weight=1.0), False, TeacherSource.CACHED),
        (RecipeSpec(alpha=0.5), True, TeacherSource.LIVE),
        (RecipeSpec(alpha=0.0, feature_weight=1.0), False, TeacherSource.LIVE),
        (RecipeSpec(alpha=0.5, attention_weight=1.0), False, TeacherSource.LIVE),
    ],
)
def test_teacher_source(recipe: RecipeSpec, live: bool, expected: TeacherSource) -> None:
    assert teacher_source(recipe, live) is expected


def test_a_space_knows_where_its_trials_get_the_teacher() -> None:
    base = {"student": {"embed_dim": 32}, "teacher": {"model": "kdsearch/digits_cnn", "checkpoint": "t.safetensors"}}
    assert parse_space({**base, "recipe": {"alpha": 0.0}}).teacher_sources() == {TeacherSource.NONE}
    assert parse_space({**base, "recipe": {"alpha": [0.0, 0.5]}}).teacher_sources() == {
        TeacherSource.NONE,
        TeacherSource.CACHED,
    }
    mixed = parse_space({**base, "recipe": {"alpha": {"low": 0.0, "high": 1.0}, "feature_weight": [0.0, 1.0]}})
    assert mixed.teacher_sources() == {TeacherSource.NONE, TeacherSource.CACHED, TeacherSource.LIVE}


def test_unknown_objective_lists_the_table() -> None:
    with pytest.raises(SpaceError, match="objectives.latency: unknown metric; allowed: val_acc, flops, macs, params"):
        parse_space({"student": {"embed_dim": 32}, "objectives": {"val_acc": "max", "latency": "min"}})


# --------------------------------------------------------------------------- a made-up objective, end to end


@pytest.fixture()
def weight_rms():
    """An objective kdsearch does not know: the RMS of the student's weights, measured after
    every epoch. Defined inside the test, so it reaches the Ray workers pickled by value."""

    def measure(ctx: objectives.MeasureContext) -> float:
        import torch

        flat = torch.cat([p.detach().flatten().float() for p in ctx.model.parameters()])
        return float(flat.pow(2).mean().sqrt())

    objective = objectives.register(
        Objective("weight_rms", "min", "RMS of the student's weights", "measured after each epoch", measure=measure)
    )
    yield objective
    del objectives.OBJECTIVES["weight_rms"]


def test_a_made_up_objective_flows_everywhere(weight_rms, digits_teacher_path: Path, tmp_path: Path, capsys) -> None:
    from kdsearch.search.run import run_search

    space_file = write_space(tmp_path, digits_teacher_path, trials=5, epochs=2, max_concurrent=1)
    raw = yaml.safe_load(space_file.read_text())
    raw["objectives"] = {"val_acc": "max", "flops": "min", "weight_rms": "min"}
    raw["hypervolume"] = {"reference": {"weight_rms": 1.0}}  # measured, no budget: the file states it
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_space(space_file).objectives == (("val_acc", "max"), ("flops", "min"), ("weight_rms", "min"))

    result = run_search(space_file, storage=tmp_path / "runs", say=lambda s: None)
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    assert len(trials) == 5
    done = trials[trials.status == "completed"]
    assert len(done) >= 3
    assert (done.weight_rms > 0).all() and trials[trials.status == "infeasible"].weight_rms.isna().all()
    assert epochs.weight_rms.notna().all()
    # the front is the non-dominated set in all three objectives
    mask = non_dominated_mask(done[["val_acc", "flops", "weight_rms"]].to_numpy(), [True, False, False])
    assert sorted(done.trial_id[mask]) == sorted(r["trial_id"] for r in result.front)
    # the sampler was told all three
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run_dir(result) / 'study.db'}")
    for _, row in done.iterrows():
        assert study.trials[row.optuna_trial].values == [row.val_acc, row.flops, row.weight_rms]

    run = str(run_dir(result))
    assert run_cli(["pareto", run, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objectives"] == [["val_acc", "max"], ["flops", "min"], ["weight_rms", "min"]]
    assert out["units"]["weight_rms"] == "RMS of the student's weights"
    assert all(r["weight_rms"] > 0 for r in out["front"])
    # the hypervolume in all three objectives, against the reference run.json holds
    reference = {"val_acc": 0.0, "flops": 0.004e9, "weight_rms": 1.0}  # worst, budget, stated
    assert json.loads((run_dir(result) / "run.json").read_text())["hypervolume_reference"] == reference
    unit = [(1 - r.val_acc, r.flops / 0.004e9, r.weight_rms / 1.0) for r in done.itertuples()]
    expected = brute_hypervolume(unit, [False] * 3, [1.0] * 3)
    assert 0 < expected < 1 and out["hypervolume"]["value"] == pytest.approx(expected)
    assert out["hypervolume"]["reference"] == reference and out["hypervolume"]["why_not"] is None
    assert run_cli(["pareto", run]) == 0
    assert "weight_rms" in capsys.readouterr().out

    assert run_cli(["status", run, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [r["weight_rms"] for r in status["front"]] == [r["weight_rms"] for r in out["front"]]
    assert status["hypervolume"]["value"] == pytest.approx(expected)

    assert run_cli(["report", run, "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    page = (tmp_path / "report" / "report.html").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "weight_rms" in page and "weight_rms" in md
    line = f"hypervolume {expected:.4f} of the box from the reference (val_acc 0, flops 4e6, weight_rms 1) to the ideal"
    assert line in md and line in page
    assert "Hypervolume over completed trials" in md and (tmp_path / "report" / "hypervolume_trials.png").exists()

    best = out["front"][0]["trial_id"]
    assert run_cli(["export", run, "--trial", best, "--out", str(tmp_path / "student")]) == 0
    card = yaml.safe_load((tmp_path / "student" / "student.yaml").read_text())
    assert card["metrics"]["weight_rms"] == pytest.approx(out["front"][0]["weight_rms"])
