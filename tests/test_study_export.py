"""study.db is synced in a thread of the driver, not inside Tune's hooks (a sync inside the
searcher's on_trial_result grows with the study and holds up every result behind it), and the
copy the dashboard reads is complete at the end of the search."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import optuna

from kdsearch.results.tables import RunPaths
from kdsearch.search.searcher import KdsearchSearcher
from kdsearch.space.file import load_space
from kdsearch.space.samplers import make_sampler

REPO = Path(__file__).resolve().parents[1]


def _searcher(tmp_path: Path) -> KdsearchSearcher:
    space = load_space(REPO / "search_spaces/digits_quick.yaml")
    return KdsearchSearcher(space, space.objectives, make_sampler(space.search), RunPaths.at(tmp_path / "run"), total=3)


def test_a_slow_sync_does_not_hold_up_the_hooks(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    mirror = searcher._mirror
    release, entered = threading.Event(), threading.Event()
    real_upload = mirror.upload
    waited: list[bool] = []

    def slow_upload() -> None:
        entered.set()
        waited.append(release.wait(timeout=30))  # False: nobody released it, the hook waited on it
        real_upload()

    mirror.upload = slow_upload  # type: ignore[method-assign]
    meta = searcher.suggest("a")["kdsearch"]
    last = int(meta["spec"]["train.epochs"])
    searcher.on_trial_result("a", {"epoch": 1, "val_acc": 0.5, "flops": 1e6})
    assert entered.wait(timeout=30), "the hook started no sync"
    # the hook has returned while the upload is blocked: the next hooks run, and start no second sync
    searcher.on_trial_complete("a", {"epoch": last, "val_acc": 0.7, "flops": 1e6})
    assert not waited, "a hook waited for the sync to finish"
    assert pickle.loads(pickle.dumps(searcher))._exporter is None  # a running thread is not saved state
    release.set()
    searcher.export_study()  # the end of the search: waits for the running sync, then syncs once more
    assert waited == [True, True]
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{tmp_path / 'run' / RunPaths.STUDY}")
    (trial,) = study.trials
    assert trial.intermediate_values == {1: 0.5, last: 0.7}
    if meta["infeasible"]:  # over the space's budget: told as failed, whatever it reached
        assert trial.user_attrs == {"ray_trial_id": "a", "status": "infeasible"}
    else:
        assert trial.state is optuna.trial.TrialState.COMPLETE
        assert trial.values == [0.7, 1e6]
        assert trial.user_attrs == {"ray_trial_id": "a", "status": "completed"}
