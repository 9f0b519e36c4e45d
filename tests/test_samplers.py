"""The samplers a space can name survive what Ray does with them: pickled with the searcher
when the Tuner starts and at every save, and restored on resume (kdsearch.space.samplers)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray.cloudpickle

from kdsearch.results.tables import RunPaths
from kdsearch.search.searcher import KdsearchSearcher
from kdsearch.space.file import load_space
from kdsearch.space.samplers import SAMPLERS, make_sampler

REPO = Path(__file__).resolve().parents[1]


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    return trial.suggest_float("x", 0, 1), trial.suggest_int("depth", 1, 6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dumps,loads", [(pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)])
def test_a_pickled_study_goes_on_as_the_original(name: str, dumps, loads) -> None:
    """Optuna 5.1's NSGA-II holds a threading.Lock (no plain pickle); a study pickled mid-run
    suggests what the original suggests next, and its sampler's lock still works."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if name == "gp":
        pytest.importorskip("scipy")
    settings = SimpleNamespace(sampler=name, population_size=4, trials=12, seed=3)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(settings))
    study.optimize(_objective, n_trials=6)
    copies = [loads(dumps(study)), copy.deepcopy(study)]
    for study_copy in copies:
        study_copy.optimize(_objective, n_trials=3)
    study.optimize(_objective, n_trials=3)
    for study_copy in copies:
        assert [t.params for t in study_copy.trials] == [t.params for t in study.trials]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_searcher_pickles_with_every_sampler(name: str, tmp_path: Path) -> None:
    """The searcher with each sampler, mid-run, through what Ray does with it (cloudpickle at
    the Tuner's start, `save` and `restore` at every save): the copies suggest what the
    original suggests next."""
    if name == "gp":
        pytest.importorskip("scipy")
    space = load_space(REPO / "search_spaces/digits_quick.yaml")
    settings = dataclasses.replace(space.search, sampler=name, population_size=4, seed=3)
    searcher = KdsearchSearcher(space, space.objectives, make_sampler(settings), RunPaths.at(tmp_path / "run"), 20)
    for i in range(6):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"epoch": 1, "val_acc": i / 10, "flops": 1e6 * (6 - i)})
    searcher.save(str(tmp_path / "state.pkl"))
    restored = KdsearchSearcher(space, space.objectives, make_sampler(space.search), RunPaths.at(tmp_path / "run"), 1)
    restored.restore(str(tmp_path / "state.pkl"))
    copies = [ray.cloudpickle.loads(ray.cloudpickle.dumps(searcher)), copy.deepcopy(searcher), restored]
    spec = searcher.suggest("next")["kdsearch"]["spec"]
    for searcher_copy in copies:
        assert searcher_copy.suggest("next")["kdsearch"]["spec"] == spec


def test_at_twelve_trials_only_nsga2_steers_more_than_two() -> None:
    """What the sampler table in README.md rests on (benchmarks/samplers.py): with kdsearch's
    settings, a 12-trial search's TPE proposes what Random proposes with the same seed for its
    first 10 trials (Optuna's n_startup_trials; GPSampler's is 10 too, left out here: its
    first fit costs seconds), NSGA-II for its first generation only (trials // 3 = 4)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(REPO / "search_spaces/digits_quick.yaml")

    def proposals(name: str) -> list[dict]:
        study = optuna.create_study(
            directions=["maximize", "minimize"],
            sampler=make_sampler(dataclasses.replace(space.search, sampler=name, trials=12, seed=1)),
        )
        for i in range(11):
            trial = study.ask()
            space.suggest(trial)
            study.tell(trial, [(i * 7 % 12) / 12, 1e6 * (i % 5 + 1)])
        return [t.params for t in study.trials]

    random = proposals("random")
    same_start = {}
    for name in ("nsga2", "tpe"):
        ours = proposals(name)
        same_start[name] = next(i for i, (a, b) in enumerate(zip(ours, random, strict=True)) if a != b)
    assert same_start == {"nsga2": 4, "tpe": 10}


@pytest.mark.parametrize("name", ["nsga2", "tpe"])  # GP's subclass is made the same way; its fits cost seconds
def test_a_sampler_told_its_space_proposes_what_it_computes(name: str) -> None:
    """`make_sampler(settings, distributions)` skips the intersection of the trials'
    distributions that the sampler computes on every ask (kdsearch.space.samplers): with a
    batch of trials running, as in a screening, it proposes exactly what the sampler that
    computes it proposes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(REPO / "search_spaces/digits_quick.yaml")
    settings = dataclasses.replace(space.search, sampler=name, population_size=4, trials=24, seed=2)
    fixed = optuna.trial.FixedTrial({n: d.default for n, d in space.dims.items()})
    space.suggest(fixed)

    def proposals(sampler: optuna.samplers.BaseSampler) -> list[dict]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for start in range(0, 28, 4):  # four in flight at a time
            trials = [study.ask() for _ in range(4)]
            for trial in trials:
                space.suggest(trial)
            for i, trial in enumerate(trials, start):
                study.tell(trial, [(i * 7 % 12) / 12, 1e6 * (i % 5 + 1)])
        return [t.params for t in study.trials]

    told = make_sampler(settings, fixed.distributions)
    assert type(told) is not type(make_sampler(settings))
    assert proposals(told) == proposals(make_sampler(settings))
