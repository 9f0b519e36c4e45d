"""What the searcher reads and restores: trials.parquet once per driver, and again after a
restore, when the table may hold trials its saved state lacks (reconciled, never run twice);
its saved state in its own format, and nothing else."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import optuna
import pandas as pd
import pytest
from ray.tune.search import Searcher

from kdsearch.errors import KdsearchError
from kdsearch.results.tables import RunPaths
from kdsearch.search.searcher import STUDY_NAME, KdsearchSearcher, SearcherStateError
from kdsearch.space.file import load_space
from kdsearch.space.samplers import make_sampler

REPO = Path(__file__).resolve().parents[1]
SPACE = load_space(REPO / "search_spaces/digits_quick.yaml")


def _searcher(run: Path, total: int, sampler: str = "nsga2") -> KdsearchSearcher:
    settings = dataclasses.replace(SPACE.search, sampler=sampler)
    return KdsearchSearcher(SPACE, SPACE.objectives, make_sampler(settings), RunPaths.at(run), total)


def test_trials_parquet_is_read_once_and_again_after_a_restore(tmp_path: Path) -> None:
    recorded = [{"trial_id": f"old{i}", "status": "completed", "val_acc": 0.5, "flops": 1e6} for i in range(2)]
    (tmp_path / "run").mkdir()
    pd.DataFrame(recorded).to_parquet(tmp_path / "run" / RunPaths.TRIALS, index=False)
    searcher = _searcher(tmp_path / "run", total=4)
    assert "kdsearch" in searcher.suggest("a")
    (tmp_path / "run" / RunPaths.TRIALS).write_bytes(b"not parquet")  # read again, this would fail
    assert "kdsearch" in searcher.suggest("b")
    assert searcher.suggest("c") == Searcher.FINISHED  # 2 recorded + 2 asked = the total, from memory
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))
    restored = _searcher(tmp_path / "run", total=4)
    restored.restore(str(saved))
    with pytest.raises(KdsearchError, match="is not a readable Parquet table"):  # it did read the table again
        restored.suggest("d")


def _row(trial_id: str, config: dict, status: str, values: tuple[float, float] | None) -> dict:
    acc, flops = values or (None, None)
    return {"trial_id": trial_id, "status": status, "val_acc": acc, "flops": flops, **config["kdsearch"]["spec"]}


def test_recorded_trials_the_saved_state_lacks_are_told_not_run(tmp_path: Path) -> None:
    """A resume after SIGKILL, made deterministic: a seeded random sampler proposes again the
    configs trials.parquet records; each is told its recorded outcome under its recorded id,
    counts toward the total, and the searcher hands Tune the next config instead."""
    first = _searcher(tmp_path / "first", total=4, sampler="random")
    configs = [first.suggest(t) for t in ("x0", "x1", "x2", "x3")]
    (tmp_path / "run").mkdir()
    rows = [_row("old0", configs[0], "stopped_early", (0.4, 2e6)), _row("old1", configs[1], "failed", None)]
    pd.DataFrame(rows).to_parquet(tmp_path / "run" / RunPaths.TRIALS, index=False)
    searcher = _searcher(tmp_path / "run", total=4, sampler="random")
    got = [searcher.suggest("a"), searcher.suggest("b")]
    assert [c["kdsearch"]["spec"] for c in got] == [c["kdsearch"]["spec"] for c in configs[2:]]
    assert searcher.suggest("c") == Searcher.FINISHED  # 2 recorded + 2 new
    trials = searcher.study.trials
    assert [t.state for t in trials[:2]] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    assert [t.user_attrs for t in trials[:2]] == [
        {"ray_trial_id": "old0", "status": "stopped_early"},
        {"ray_trial_id": "old1", "status": "failed"},
    ]
    assert [c["kdsearch"]["optuna_trial"] for c in got] == [2, 3]
    searcher.on_trial_result("a", {"epoch": 1, "val_acc": 0.25, "flops": 1e6})  # "a" is trial 2, not old0's
    assert searcher.study.trials[2].intermediate_values == {1: 0.25} and not trials[0].intermediate_values


def test_a_state_of_another_format_is_refused_in_one_line(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path / "run", total=2)
    foreign = tmp_path / "searcher-state.pkl"
    foreign.write_bytes(pickle.dumps({"_ot_trials": {}, "_metric": ["val_acc", "flops"]}))  # OptunaSearch's dict
    with pytest.raises(SearcherStateError, match="written by another kdsearch version") as refused:
        searcher.restore(str(foreign))
    assert "\n" not in str(refused.value) and str(foreign) in str(refused.value)
    foreign.write_bytes(b"ckdsearch.search.searcher\nNoSuchSearcher\n.")
    with pytest.raises(SearcherStateError):  # a class this kdsearch does not have
        searcher.restore(str(foreign))


def test_a_restored_searcher_goes_on_as_the_original(tmp_path: Path) -> None:
    """Saved mid-run and restored into a searcher built afresh (what Tune does on --resume): the
    same trial map, study, labels and next suggestion."""
    searcher = _searcher(tmp_path / "run", total=5)
    searcher.suggest("a")
    searcher.on_trial_result("a", {"epoch": 1, "val_acc": 0.5, "flops": 1e6})
    searcher.on_trial_complete("a", {"epoch": 1, "val_acc": 0.5, "flops": 1e6})
    searcher.suggest("b")  # running when saved
    searcher.save(str(tmp_path / "state.pkl"))
    restored = _searcher(tmp_path / "elsewhere", total=1)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.total == 5 and restored.objectives == list(SPACE.objectives)
    assert restored.study.study_name == STUDY_NAME
    assert [(t.number, t.state, t.user_attrs) for t in restored.study.trials] == [
        (t.number, t.state, t.user_attrs) for t in searcher.study.trials
    ]
    restored.on_trial_complete("b", None, error=True)
    searcher.on_trial_complete("b", None, error=True)
    assert restored.study.trials[1].state == optuna.trial.TrialState.FAIL
    assert restored.suggest("c") == searcher.suggest("c")
