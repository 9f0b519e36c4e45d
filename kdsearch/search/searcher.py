"""Optuna, as Ray Tune's searcher: the define-by-run space, and a multi-objective OptunaSearch
that tells Optuna how each trial ended (kdsearch.results.outcomes' mapping) and mirrors the
study to the run's study.db for optuna-dashboard.

A trial's Tune config is `{"kdsearch": {"spec": flat TrialSpec, "infeasible": bool,
"optuna_trial": n}}` (made by `DefineByRun`); `outcome` reads how a trial ended from it.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import warnings
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdsearch.results.outcomes import OPTUNA_STATE, Status, status_of
from kdsearch.results.tables import RunPaths
from kdsearch.search.study_mirror import StudyMirror
from kdsearch.space.objectives import Pairs, values_for_sampler
from kdsearch.space.search_space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


def outcome(config: dict[str, Any], last_result: dict[str, Any] | None, errored: bool = False) -> Status:
    """How a Tune trial ended (kdsearch.results.outcomes' rule, from the facts its config holds)."""
    meta = config["kdsearch"]
    return status_of(meta["infeasible"], int(meta["spec"]["train.epochs"]), last_result, errored)


class KdsearchOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, with early-stopped trials entering the study as PRUNED (not as
    finished with an early-epoch accuracy), failed ones as FAIL, and the study mirrored live to
    a SQLite file in the run directory for optuna-dashboard: the objectives' names, each
    trial's Ray trial id and status (running, then how it ended) as user attributes, and the
    accuracy after every epoch as its intermediate values.

    Optuna refuses `Trial.report` in a multi-objective study, so the epochs' values go to the
    study's storage directly (`set_trial_intermediate_value`, what `report` itself calls), as
    the first maximized objective (val_acc), the value the dashboard draws as a trial's curve."""

    # study.db is brought up to date at most this often (and at the end of the search), or less
    # often when a sync and upload took longer: at most a tenth of the driver's time. The sync
    # runs in a thread of the driver, off Tune's hooks: a slow one (a large upload, a busy
    # disk) never holds up the search's loop, which only starts it.
    EXPORT_SECONDS = 5.0

    def __init__(self, *args: Any, run: RunPaths, total: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._run = run  # pickled with the searcher as its location
        self._total = total
        self._last_export = 0.0
        self._export_took = 0.0  # seconds the last sync and upload of study.db took
        self._configs: dict[str, dict[str, Any]] = {}  # trial id -> config (saved with the searcher)
        self._lost: dict[str, dict[str, Any]] | None = None  # recorded trials Optuna has not seen (suggest)
        self._mirror = StudyMirror(run.store, RunPaths.STUDY)
        self._exporter: threading.Thread | None = None  # the sync running now, if any
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard labels axes by
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(self._metric))
        self._progress = next((m for m, mode in self.objectives if mode == "max"), self._metric[0])

    @property
    def total(self) -> int:
        """The trials the run is to have in all (recorded ones included)."""
        return self._total

    @property
    def objectives(self) -> Pairs:
        return list(zip(self._metric, self._mode))

    def __getstate__(self) -> dict[str, Any]:
        # _lost is read again from trials.parquet by a restored searcher; a thread is not state
        return {**self.__dict__, "_lost": None, "_exporter": None}

    def save(self, checkpoint_path: str) -> None:
        """Ray's OptunaSearch.save (its __dict__, pickled), less what trials.parquet holds."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._lost = None
        self.__dict__.setdefault("_export_took", 0.0)  # a searcher saved by an older kdsearch
        self._exporter = None

    def suggest(self, trial_id: str) -> dict | str | None:
        """Ask Optuna for a config, reconciling with trials.parquet after a resume.

        Ray saves the searcher's state every few seconds, so a driver killed with SIGKILL can
        come back without trials that finished after the last save; trials.parquet still has
        them. They count toward the requested total (FINISHED once it is reached), and when the
        restored sampler proposes one of their configs again, that trial is told its recorded
        outcome and a fresh config is asked for: no config runs twice.

        trials.parquet is read once, at the searcher's first suggestion (in a fresh or a
        restored driver); from then on the trials Optuna has not seen are kept in memory, so a
        suggestion costs the same at the 10,000th trial as at the first.
        """
        if trial_id in self._ot_trials:
            return super().suggest(trial_id)
        if getattr(self, "_lost", None) is None:
            self._lost = {
                r["trial_id"]: r for r in self._run.rows(RunPaths.TRIALS) if r["trial_id"] not in self._ot_trials
            }
        lost = self._lost
        if len(self._ot_trials) + len(lost) >= self._total:  # recorded, or asked of Optuna
            return Searcher.FINISHED
        while True:
            config = super().suggest(trial_id)
            spec = config["kdsearch"]["spec"]
            match = next((tid for tid, r in lost.items() if all(r.get(k) == v for k, v in spec.items())), None)
            if match is None:
                self._configs[trial_id] = config
                return config
            row = lost.pop(match)
            ot_trial = self._ot_trials.pop(trial_id)
            self._tell(ot_trial, Status(row["status"]), row, match)
            self._ot_trials[match] = ot_trial
            self._completed_trials.add(match)
            if len(self._ot_trials) + len(lost) >= self._total:
                return Searcher.FINISHED

    def _tell(self, ot_trial: Any, status: Status, result: dict[str, Any] | None, trial_id: str | None = None) -> None:
        """Tell Optuna how a trial ended (kdsearch.results.outcomes' mapping to its states)."""
        self._label(ot_trial, trial_id, status.value)
        state = optuna.trial.TrialState[OPTUNA_STATE[status]]
        if state is optuna.trial.TrialState.COMPLETE:
            self._ot_study.tell(ot_trial, values_for_sampler(result or {}, self.objectives))
        else:
            self._ot_study.tell(ot_trial, state=state)

    def _label(self, ot_trial: Any, trial_id: str | None, status: str) -> None:
        """The user attributes optuna-dashboard shows: the Ray trial id and the kdsearch status."""
        if trial_id is not None:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        ot_trial.set_user_attr("status", status)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An epoch's result: its accuracy as the trial's intermediate value at that epoch (a
        retry's epochs overwrite the failed attempt's)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or not result.get("epoch"):
            return
        self._label(ot_trial, trial_id, "running")
        self._intermediate(ot_trial, result)
        self._export_quietly(when_due=True)

    def _intermediate(self, ot_trial: Any, result: dict) -> None:
        storage = self._ot_study._storage
        storage.set_trial_intermediate_value(ot_trial._trial_id, int(result["epoch"]), float(result[self._progress]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result and result.get("epoch") and not error:  # the last epoch: Tune does not pass a stopping result on
            self._intermediate(self._ot_trials[trial_id], result)
        self._tell(self._ot_trials[trial_id], outcome(self._configs[trial_id], result, error), result, trial_id)
        self._completed_trials.add(trial_id)
        self._export_quietly(when_due=True)

    def _export_quietly(self, when_due: bool = False) -> None:
        """Start bringing study.db up to date in a thread, when the last sync is over and due."""
        if self._exporter is not None and self._exporter.is_alive():
            return
        if when_due and time.monotonic() - self._last_export < max(self.EXPORT_SECONDS, 10 * self._export_took):
            return
        self._last_export = time.monotonic()  # not due again until this one's time has passed
        self._exporter = threading.Thread(target=self._sync_logged, name="kdsearch-study-export", daemon=True)
        self._exporter.start()

    def _sync_logged(self) -> None:
        try:
            self._sync()
        except Exception as e:  # the dashboard's copy must never fail the search
            log.warning("could not export the Optuna study: %s", e)

    def _sync(self) -> None:
        """The mirror's sync and upload, in a thread while the searcher goes on: Optuna's
        in-memory storage locks its reads and replaces a trial it changes, but `optuna.Trial`
        edits the trial it was handed, so the mirror copies each trial before using it."""
        start = time.monotonic()
        self._mirror.sync(self._ot_study)
        synced = time.monotonic()
        self._mirror.upload()
        self._last_export = time.monotonic()
        self._export_took = self._last_export - start
        if self._export_took > 10:
            log.info("study.db export took %.1f s (sync %.1f s, upload %.1f s)",
                     self._export_took, synced - start, self._last_export - synced)  # fmt: skip

    def export_study(self) -> None:
        """Bring the run's study.db up to date with the in-memory study now (at the end of the
        search: after the sync that may be running finishes)."""
        if self._exporter is not None:
            self._exporter.join()
            self._exporter = None
        self._sync()

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


class DefineByRun:
    """The space as OptunaSearch's define-by-run function (a class: Ray pickles the searcher)."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        spec = self.space.suggest(trial)  # calls trial.set_constraint for the budgets
        return {
            "kdsearch": {
                "spec": spec.to_dict(),
                "infeasible": not self.space.budget.feasible(spec.student),
                "optuna_trial": int(trial.number),
            }
        }
