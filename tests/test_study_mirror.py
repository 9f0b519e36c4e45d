"""study.db's mirror of the searcher's in-memory study: every change reaches it, whenever the
sync runs (kdsearch.search.study_mirror)."""

from __future__ import annotations

from pathlib import Path

import optuna

from kdsearch.search.study_mirror import StudyMirror
from kdsearch.storage import Storage


def _study() -> tuple[optuna.Study, optuna.storages.InMemoryStorage]:
    """A two-objective study in a storage of its own, as the searcher holds one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    return optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"]), storage


def _mirrored(mirror: StudyMirror) -> list[optuna.trial.FrozenTrial]:
    mirror.upload()
    db = Path(mirror.store.base) / "study.db"
    return optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{db}").trials


def test_a_trial_changed_after_a_sync_reaches_the_mirror(tmp_path: Path) -> None:
    """A sync right after `ask` keeps the trial as the in-memory storage handed it out, and
    `optuna.Trial` then writes its attributes into that very object: the change is still found."""
    study, storage = _study()
    mirror = StudyMirror(Storage.open(tmp_path / "run"), "study.db")
    done = study.ask()
    study.tell(done, [0.5, 1.0])
    trial = study.ask()
    mirror.sync(storage, "s")  # the new trial, as it is now: no parameters, attributes or values yet
    trial.suggest_int("depth", 1, 6)
    trial.set_user_attr("ray_trial_id", "a")
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), trial.number)
    storage.set_trial_intermediate_value(trial_id, 1, 0.25)  # as the searcher does (2 objectives)
    mirror.sync(storage, "s")
    [first, running] = _mirrored(mirror)
    assert first.state == optuna.trial.TrialState.COMPLETE and first.values == [0.5, 1.0]
    assert running.user_attrs == {"ray_trial_id": "a"} and running.intermediate_values == {1: 0.25}
    assert running.params == trial.params and running.state == optuna.trial.TrialState.RUNNING

    trial.set_user_attr("status", "completed")
    study.tell(trial, [0.75, 2.0])
    mirror.sync(storage, "s")
    ended = _mirrored(mirror)[1]
    assert ended.user_attrs == {"ray_trial_id": "a", "status": "completed"}
    assert ended.state == optuna.trial.TrialState.COMPLETE and ended.values == [0.75, 2.0]


def test_a_change_made_while_the_sync_writes_reaches_the_mirror(tmp_path: Path) -> None:
    """The sync runs in a thread while the searcher labels trials. A label set after the sync
    read a trial, but before it was done with it, must reach study.db at the next sync (else
    study.db lacks the trial's `ray_trial_id`). The interleaving is forced: the searcher's
    write runs inside the mirror's own write of the same trial."""
    study, storage = _study()
    mirror = StudyMirror(Storage.open(tmp_path / "run"), "study.db")
    mirror.sync(storage, "s")  # opens the mirror's own storage
    trial = study.ask()
    writes = mirror._storage

    class Interleaved:
        """The mirror's storage; the searcher labels the trial while the mirror writes it."""

        def __getattr__(self, name: str):
            return getattr(writes, name)

        def create_new_trial(self, *args, **kwargs):
            made = writes.create_new_trial(*args, **kwargs)
            trial.set_user_attr("ray_trial_id", "a")
            return made

        def set_trial_user_attr(self, *args, **kwargs):
            writes.set_trial_user_attr(*args, **kwargs)
            trial.set_user_attr("status", "running")

    mirror._storage = Interleaved()
    mirror.sync(storage, "s")  # writes the new trial; the label lands during that write
    mirror.sync(storage, "s")  # finds the label; the status lands during its write
    mirror._storage = writes
    mirror.sync(storage, "s")
    [running] = _mirrored(mirror)
    assert running.user_attrs == {"ray_trial_id": "a", "status": "running"}
