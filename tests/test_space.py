"""The search-space language: bundled spaces load, suggest is define-by-run, specs round-trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest

import kdsearch
from kdsearch.errors import SpaceError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.dimensions import Choice, Dimension, FloatRange, IntRange, cardinality
from kdsearch.space.file import load_space, parse_sets, parse_space
from kdsearch.space.search_space import Budget, EarlyStopping, Resources, SearchSettings
from kdsearch.space.specs import SEED_MAX, DataSpec, RecipeSpec, TeacherSpec, TrainSpec, TrialSpec
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def searched(dim: Dimension) -> bool:
    """A dimension the sampler chooses in: more than one value (a float range: low < high)."""
    return cardinality(dim) > 1


def test_bundled_spaces_are_there() -> None:
    assert {p.name for p in SPACES} >= {"digits_quick.yaml", "cifar10_vit_tiny.yaml", "imagenet_deit_tiny.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
@pytest.mark.parametrize(
    "sampler", [optuna.samplers.RandomSampler, optuna.samplers.NSGAIISampler, optuna.samplers.TPESampler]
)
def test_every_sampled_config_is_consistent_and_replays(path: Path, sampler: type) -> None:
    """Real Optuna studies drive the define-by-run space; FixedTrial replays each config exactly."""
    space = load_space(path)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler(seed=0))
    for i in range(30):
        trial = study.ask()
        spec = space.suggest(trial)
        assert spec.student.problems() == []
        assert TrialSpec.from_dict(spec.to_dict()) == spec
        replay = space.suggest(optuna.trial.FixedTrial(trial.params))
        assert replay == spec
        fc = kdsearch.count_flops(spec.student)
        study.tell(trial, [float(i % 7), fc.flops])
    # the sampler saw only searched dimensions, under their dotted names
    assert set(study.trials[0].params) == {k for k, d in space.dims.items() if searched(d)}


def test_budget_is_told_to_optuna_as_constraints() -> None:
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    feasible = infeasible = 0
    for _ in range(60):
        trial = study.ask()
        spec = space.suggest(trial)
        gflops = kdsearch.count_flops(spec.student).flops / 1e9
        violation = study._storage.get_trial(trial._trial_id).system_attrs["constraints:max_gflops"]
        assert math.isclose(violation, gflops / space.budget.max_gflops - 1.0)
        assert (violation <= 0) == space.budget.feasible(spec.student) == (gflops <= space.budget.max_gflops)
        feasible += violation <= 0
        infeasible += violation > 0
        study.tell(trial, [1.0, gflops])
    assert feasible and infeasible
    # Optuna keeps infeasible trials off the front
    assert all(t.system_attrs["constraints:max_gflops"] <= 0 for t in study.best_trials)


def test_default_spec_takes_defaults_then_first_choice_then_middle() -> None:
    space = parse_space(
        {
            "student": {
                "embed_dim": {"choices": [32, 64], "default": 64},
                "depth": {"low": 2, "high": 6},
                "num_heads": [4, 2],
                "pos_embed": ["rope", "learned"],
            },
            "recipe": {"alpha": {"low": 0.2, "high": 0.6}, "temperature": {"low": 1.0, "high": 16.0, "log": True}},
        }
    )
    spec = space.default_spec()
    assert spec.student.embed_dim == 64
    assert spec.student.depth == 4
    assert spec.student.num_heads == 4
    assert spec.student.pos_embed == "rope"
    assert spec.recipe.alpha == pytest.approx(0.4)
    assert spec.recipe.temperature == pytest.approx(4.0)  # geometric middle of a log range
    assert spec.student.img_size == 16 and spec.student.in_chans == 1 and spec.student.num_classes == 10


def test_overrides_are_checked() -> None:
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    spec = space.default_spec(parse_sets(space, ["student.depth=2", "recipe.alpha=1", "train.lr=1e-3"]))
    assert spec.student.depth == 2 and spec.recipe.alpha == 1.0 and isinstance(spec.recipe.alpha, float)
    assert spec.train.lr == 1e-3  # a YAML 1.2 float, as in a space file
    with pytest.raises(SpaceError, match="student.dpth: is not a dimension"):
        parse_sets(space, ["student.dpth=2"])
    with pytest.raises(SpaceError, match="student.depth: must be an integer"):
        parse_sets(space, ["student.depth=x"])
    with pytest.raises(SpaceError, match="expected KEY=VALUE"):
        parse_sets(space, ["student.depth"])
    with pytest.raises(SpaceError, match="embed_dim 64 is not divisible by num_heads 3"):
        space.default_spec(parse_sets(space, ["student.num_heads=3"]))


def test_head_dim_makes_embed_dim() -> None:
    space = load_space(ROOT / "search_spaces/cifar10_vit_tiny.yaml")
    spec = space.default_spec({"student.num_heads": 4})
    assert spec.student.embed_dim == 256 and spec.student.head_dim == 64
    assert "student.head_dim" in space.dims and "student.embed_dim" not in space.dims


def test_yaml_12_floats_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("student: {embed_dim: 32}\ntrain: {lr: 1e-3}\nteacher: {checkpoint: ../t.safetensors}\n")
    space = load_space(path)
    assert space.dims["train.lr"].default == 0.001
    assert space.teacher.checkpoint == str(tmp_path / "t.safetensors")


def test_dimension_kinds() -> None:
    space = parse_space(
        {
            "student": {
                "embed_dim": 32,
                "depth": {"low": 2, "high": 8, "step": 2},
                "mlp_ratio": {"low": 1.0, "high": 4.0},
            },
            "train": {"batch_size": {"low": 16, "high": 256, "log": True}},
        }
    )
    assert space.dims["student.depth"] == IntRange(2, 8, 2)
    assert space.dims["student.depth"].values() == [2, 4, 6, 8]
    assert isinstance(space.dims["student.mlp_ratio"], FloatRange)
    assert math.isinf(space.num_architectures())
    rng = np.random.default_rng(0)
    sizes = [space.dims["train.batch_size"].sample(rng) for _ in range(500)]
    assert min(sizes) >= 16 and max(sizes) <= 256
    assert np.median(sizes) < 100  # log-uniform: the median sits near sqrt(16 * 256) = 64, not 136
    assert isinstance(Choice((1, 2)).sample(rng), int)


def test_to_dict_is_flat_and_dotted() -> None:
    spec = load_space(ROOT / "search_spaces/digits_quick.yaml").default_spec()
    d = spec.to_dict()
    assert d["student.depth"] == 4 and d["recipe.alpha"] == 0.7 and d["data.name"] == "digits"
    assert all(k.count(".") == 1 for k in d)
    json.dumps(d)  # plain values only: it doubles as Ray Tune config and Parquet columns
    assert TrialSpec.from_dict({k: np.asarray(v).item() if v is not None else None for k, v in d.items()}) == spec
    with pytest.raises(KeyError):
        TrialSpec.from_dict({"student.nope": 1})


def test_space_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["space", "show", str(ROOT / "search_spaces/digits_quick.yaml"), "--json", "--samples", "500"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architectures"] == 4 * 6 * 2 * 3 * 2 * 6 * 2
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    flops = [kdsearch.count_flops(s).flops for s in space.architectures()]
    assert summary["gflops"]["min"] == min(flops) / 1e9 and summary["gflops"]["max"] == max(flops) / 1e9
    assert 0 < summary["budget"]["share_inside"] < 1
    assert summary["budget"]["samples"] == 500


def test_space_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["space", "show", str(ROOT / "search_spaces/imagenet_deit_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "student.pos_embed" in out and "architectures: 576" in out and "GFLOPs" in out


def test_left_out_sections_take_their_dataclass_defaults() -> None:
    """A section's defaults are its dataclass's: a space stating only a student gets each one."""
    space = parse_space({"student": {"embed_dim": 64}})
    assert space.budget == Budget()
    assert space.resources == Resources()
    assert space.early_stopping == EarlyStopping()
    assert space.search == SearchSettings()
    assert space.teacher == TeacherSpec()
    assert space.data == DataSpec(num_classes=DATASETS["digits"].num_classes)
    assert space.default_spec().train == TrainSpec()
    assert space.default_spec().recipe == RecipeSpec()


@pytest.mark.parametrize("key", ["train.seed", "search.seed"])
def test_every_seed_a_space_allows_is_in_seed_range(key: str) -> None:
    section, _, name = key.partition(".")
    parse_space({"student": {"embed_dim": 64}, section: {name: SEED_MAX}})
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(SpaceError, match=f"{key}: must be an integer from 0 to "):
            parse_space({"student": {"embed_dim": 64}, section: {name: bad}})
