"""The samplers a space can name survive what Ray does with them: pickled with the searcher
when the Tuner starts and at every save, and restored on resume (kdsearch.space.samplers)."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import optuna
import pytest
import ray.cloudpickle

from kdsearch.space.samplers import SAMPLERS, make_sampler


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
