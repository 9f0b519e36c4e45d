"""KdsearchSearcher as Ray Tune runs it: a real Tuner on an embedded Ray with a trivial
trainable, interrupted after two trials, then `Tuner.restore`d from its saved state and
finished; Optuna sees every trial once, with the outcome, labels and curve the searcher gives
it, and the searcher state Tune saved is the searcher's own format (another format is refused
by `Tuner.restore` itself, in one line)."""

from __future__ import annotations

import pickle
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
from ray import tune

from kdsearch.results.tables import RunPaths
from kdsearch.search import searcher as searcher_module
from kdsearch.search.searcher import STATE_FORMAT, KdsearchSearcher, SearcherStateError, outcome
from kdsearch.space.file import load_space
from kdsearch.space.samplers import make_sampler

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2


def _trainable(config: dict[str, Any]) -> None:
    """Reports each epoch of the trial's spec with an accuracy that grows and its FLOPs."""
    spec = config["kdsearch"]["spec"]
    for epoch in range(1, int(spec["train.epochs"]) + 1):
        tune.report({"epoch": epoch, "val_acc": 0.1 * epoch + spec["recipe.alpha"] / 100, "flops": 1e6})


class Interrupt(tune.Callback):
    """Interrupts the search (SIGINT, as Ctrl+C: Tune saves its state and returns) once `after`
    trials have ended, while armed (a class attribute: the restored copy reads it too); and
    brings study.db up to date at the end, as the recorder does."""

    armed = True

    def __init__(self, searcher: KdsearchSearcher, after: int):
        self.searcher, self.after, self.ended = searcher, after, 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        if Interrupt.armed and self.ended == self.after:
            signal.raise_signal(signal.SIGINT)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.searcher.export_study()


@pytest.fixture(scope="module")
def embedded_ray():
    """An embedded Ray of 2 CPUs for this module, or the one a search of the session left running."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_a_tuner_runs_saves_and_restores_the_searcher(embedded_ray, tmp_path: Path, monkeypatch) -> None:
    text = (REPO / "search_spaces/digits_quick.yaml").read_text()
    (tmp_path / "space.yaml").write_text(text.replace("epochs: 30", f"epochs: {EPOCHS}"))
    space = load_space(tmp_path / "space.yaml")
    run = RunPaths.at(tmp_path / "run")
    searcher = KdsearchSearcher(space, space.objectives, make_sampler(space.search), run, total=4)
    tuner = tune.Tuner(
        _trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=4, max_concurrent_trials=1),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(tmp_path), callbacks=[Interrupt(searcher, after=2)], verbose=0
        ),
    )
    Interrupt.armed = True
    first = tuner.fit()
    assert sum(1 for r in first if r.metrics.get("done")) < 4  # interrupted
    [state_file] = (tmp_path / "tune").glob("searcher-state-*.pkl")
    with open(state_file, "rb") as f:
        assert pickle.load(f)["format"] == STATE_FORMAT

    Interrupt.armed = False
    with monkeypatch.context() as patched:  # a kdsearch whose searcher state has another format
        patched.setattr(searcher_module, "STATE_FORMAT", "kdsearch-searcher/0")
        with pytest.raises(SearcherStateError, match="written by another kdsearch version"):
            tune.Tuner.restore(str(tmp_path / "tune"), trainable=_trainable, resume_unfinished=True)
    restored = tune.Tuner.restore(str(tmp_path / "tune"), trainable=_trainable, resume_unfinished=True)
    grid = restored.fit()
    results = {r.metrics["trial_id"]: r for r in grid}
    assert len(results) == 4 and not grid.errors
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{tmp_path / 'run' / RunPaths.STUDY}")
    assert len(study.trials) == 4  # each Tune trial once, none asked twice
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(results)
    for trial in study.trials:
        result = results[trial.user_attrs["ray_trial_id"]]
        assert result.config["kdsearch"]["optuna_trial"] == trial.number
        status = outcome(result.config, result.metrics)
        assert trial.user_attrs["status"] == status.value
        assert trial.state == optuna.trial.TrialState.COMPLETE  # completed or infeasible, both told COMPLETE
        if status.measured:
            assert trial.values == [result.metrics["val_acc"], 1e6]
            assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
