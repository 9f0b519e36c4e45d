"""Optuna, as Ray Tune's searcher: the define-by-run space, and `KdsearchSearcher`, a Ray Tune
`Searcher` over Optuna's ask and tell that tells Optuna how each trial ended
(kdsearch.results.outcomes' mapping), reconciles with trials.parquet after a resume, and
mirrors the study to the run's study.db for optuna-dashboard.

A trial's Tune config is `{"kdsearch": {"spec": flat TrialSpec, "infeasible": bool,
"optuna_trial": n}}` (made by `DefineByRun`) beside the trial's Optuna parameters; `outcome`
reads how a trial ended from it.

The searcher holds its study in an `optuna.storages.InMemoryStorage` it creates itself and
touches Optuna only through public API: `Study.ask` and `Study.tell` (by trial number), and the
storage's `BaseStorage` methods for what a multi-objective study's `Trial` refuses (each epoch's
accuracy as an intermediate value) and for the labels optuna-dashboard shows.
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

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import OPTUNA_STATE, Status, status_of
from kdsearch.results.tables import RunPaths
from kdsearch.search.study_mirror import StudyMirror
from kdsearch.space.objectives import Pairs, accuracy_and_cost, values_for_sampler
from kdsearch.space.search_space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

STUDY_NAME = "kdsearch"
"""The study's name, in the searcher's storage and in study.db."""

STATE_FORMAT = "kdsearch-searcher/1"
"""The format of the state `KdsearchSearcher` saves (and pickles as); any other is refused."""


class SearcherStateError(KdsearchError):
    """A saved searcher state this kdsearch cannot read (written by another kdsearch version)."""


def outcome(config: dict[str, Any], last_result: dict[str, Any] | None, errored: bool = False) -> Status:
    """How a Tune trial ended (kdsearch.results.outcomes' rule, from the facts its config holds)."""
    meta = config["kdsearch"]
    return status_of(meta["infeasible"], int(meta["spec"]["train.epochs"]), last_result, errored)


class KdsearchSearcher(Searcher):
    """A multi-objective Optuna study as Ray Tune's searcher.

    Each Tune trial is one Optuna trial, asked when Tune asks for a config and told when the
    trial ends: completed and infeasible trials COMPLETE with their values (an infeasible one
    with its constraints and each measured objective at its worst), early-stopped ones
    PRUNED (not finished with an early epoch's accuracy), failed ones FAIL. Each trial carries
    its Ray trial id and kdsearch status (running, then how it ended) as user attributes, and
    the accuracy after every epoch (the first maximized objective) as its intermediate values,
    the curve the dashboard draws; the study is mirrored to study.db (kdsearch.search.study_mirror).

    Its state (the storage, the sampler, the map of Ray trial ids to Optuna trial numbers, the
    configs) is one dict in its own format, `STATE_FORMAT`: what `save` writes, `restore`
    reads, and the searcher pickles as (Ray pickles it when the Tuner starts and at every save).

    Args:
        space: the search space, suggested define-by-run (`DefineByRun`).
        objectives: the run's objectives as (name, "max" or "min") pairs, in the study's order.
        sampler: the Optuna sampler (`kdsearch.space.samplers.make_sampler`); it must pickle.
        run: the run's paths: trials.parquet (reconciliation) and study.db (the mirror).
        total: the trials the run is to have in all, recorded ones included.
    """

    # study.db is brought up to date at most this often (and at the end of the search), or less
    # often when a sync and upload took longer: at most a tenth of the driver's time. The sync
    # runs in a thread of the driver, off Tune's hooks: a slow one (a large upload, a busy
    # disk) never holds up the search's loop, which only starts it.
    EXPORT_SECONDS = 5.0

    def __init__(
        self, space: SearchSpace, objectives: Pairs, sampler: optuna.samplers.BaseSampler, run: RunPaths, total: int
    ):
        storage = optuna.storages.InMemoryStorage()
        directions = ["maximize" if mode == "max" else "minimize" for _, mode in objectives]
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=STUDY_NAME, directions=directions)
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard labels axes by
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([name for name, _ in objectives])
        self._load(
            {
                "format": STATE_FORMAT,
                "space": DefineByRun(space),
                "objectives": [(name, mode) for name, mode in objectives],
                "run": run,
                "total": total,
                "storage": storage,
                "sampler": sampler,
                "trials": {},
                "finished": set(),
                "configs": {},
            }
        )

    def _load(self, state: Any, source: str = "the searcher's pickled state") -> None:
        """Take `state` (`STATE_FORMAT`) as the searcher's whole state; refuse any other."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SearcherStateError(
                f"{source} was written by another kdsearch version (not {STATE_FORMAT}): resume the run with "
                f"the kdsearch that started it, or start a new run from its trials with --from"
            )
        objectives: list[tuple[str, str]] = [(name, mode) for name, mode in state["objectives"]]
        super().__init__(metric=[name for name, _ in objectives], mode=[mode for _, mode in objectives])
        self._space: DefineByRun = state["space"]
        self._objectives = objectives
        self._run: RunPaths = state["run"]  # pickled as its location
        self._total = int(state["total"])
        self._storage: optuna.storages.BaseStorage = state["storage"]
        self._study = optuna.load_study(
            study_name=STUDY_NAME, storage=self._storage, sampler=state["sampler"], pruner=optuna.pruners.NopPruner()
        )
        self._study_id = self._storage.get_study_id_from_name(STUDY_NAME)
        self._trials: dict[str, int] = dict(state["trials"])  # Ray trial id -> Optuna trial number
        self._finished: set[str] = set(state["finished"])  # Ray trial ids Optuna was told the end of
        self._configs: dict[str, dict[str, Any]] = dict(state["configs"])  # Ray trial id -> its config
        self._progress, _ = accuracy_and_cost(objectives)  # the intermediate values' objective
        # not state: the recorded trials Optuna has not seen are read again from trials.parquet
        # (suggest), a restored mirror starts afresh, a thread does not pickle
        self._lost: dict[str, dict[str, Any]] | None = None
        self._mirror = StudyMirror(self._run.store, RunPaths.STUDY)
        self._exporter: threading.Thread | None = None  # the sync running now, if any
        self._last_export = 0.0
        self._export_took = 0.0  # seconds the last sync and upload of study.db took

    def state(self) -> dict[str, Any]:
        """The searcher's whole state in `STATE_FORMAT` (what `save` writes)."""
        return {
            "format": STATE_FORMAT,
            "space": self._space,
            "objectives": list(self._objectives),
            "run": self._run,
            "total": self._total,
            "storage": self._storage,
            "sampler": self._study.sampler,
            "trials": dict(self._trials),
            "finished": set(self._finished),
            "configs": dict(self._configs),
        }

    def __getstate__(self) -> dict[str, Any]:
        return self.state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(state)

    def save(self, checkpoint_path: str) -> None:
        """Write the searcher's state (`STATE_FORMAT`, pickled) to `checkpoint_path`."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.state(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Read back what `save` wrote.

        Raises:
            SearcherStateError: the file holds another format (another kdsearch version's searcher).
        """
        with open(checkpoint_path, "rb") as f:
            try:
                state = pickle.load(f)
            except (AttributeError, ImportError):  # a class this kdsearch no longer has
                state = None
        self._load(state, source=f"the searcher state {checkpoint_path}")

    @property
    def total(self) -> int:
        """The trials the run is to have in all (recorded ones included)."""
        return self._total

    @property
    def objectives(self) -> Pairs:
        """The run's objectives, (name, "max" or "min"), in the study's order."""
        return list(self._objectives)

    @property
    def study(self) -> optuna.Study:
        """The searcher's Optuna study (warm starts and enqueued configs are added to it)."""
        return self._study

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

        Args:
            trial_id: Tune's id for the trial the config is for.

        Returns:
            The trial's config, or `Searcher.FINISHED` once the run has its total.
        """
        if trial_id in self._configs:
            return self._configs[trial_id]
        if self._lost is None:
            self._lost = {
                r["trial_id"]: r for r in self._run.rows(RunPaths.TRIALS) if r["trial_id"] not in self._trials
            }
        lost = self._lost
        while len(self._trials) + len(lost) < self._total:  # recorded, or asked of Optuna
            trial = self._study.ask()
            made = self._space(trial)  # suggests the trial's parameters
            config = {**trial.params, **made}
            spec = config["kdsearch"]["spec"]
            match = next((tid for tid, r in lost.items() if all(r.get(k) == v for k, v in spec.items())), None)
            if match is None:
                self._trials[trial_id] = trial.number
                self._configs[trial_id] = config
                return config
            row = lost.pop(match)
            self._trials[match] = trial.number
            self._tell(match, Status(row["status"]), row)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An epoch's result: its accuracy as the trial's intermediate value at that epoch (a
        retry's epochs overwrite the failed attempt's)."""
        if trial_id not in self._trials or trial_id in self._finished or not result.get("epoch"):
            return
        self._label(trial_id, "running")
        self._intermediate(trial_id, result)
        self._export_quietly(when_due=True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna how the trial ended (kdsearch.results.outcomes' rule and mapping)."""
        if trial_id in self._finished or trial_id not in self._trials:
            return
        if result and result.get("epoch") and not error:  # the last epoch: Tune does not pass a stopping result on
            self._intermediate(trial_id, result)
        self._tell(trial_id, outcome(self._configs[trial_id], result, error), result)
        self._export_quietly(when_due=True)

    def _optuna_id(self, trial_id: str) -> int:
        """The storage's id of the Optuna trial that Ray's `trial_id` is."""
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_id, self._trials[trial_id])

    def _tell(self, trial_id: str, status: Status, result: dict[str, Any] | None) -> None:
        """Tell Optuna how a trial ended (kdsearch.results.outcomes' mapping to its states)."""
        self._label(trial_id, status.value)
        state = optuna.trial.TrialState[OPTUNA_STATE[status]]
        number = self._trials[trial_id]
        if state is optuna.trial.TrialState.COMPLETE:
            self._study.tell(number, values_for_sampler(result or {}, self._objectives))
        else:
            self._study.tell(number, state=state)
        self._finished.add(trial_id)

    def _label(self, trial_id: str, status: str) -> None:
        """The user attributes optuna-dashboard shows: the Ray trial id and the kdsearch status."""
        optuna_id = self._optuna_id(trial_id)
        self._storage.set_trial_user_attr(optuna_id, "ray_trial_id", trial_id)
        self._storage.set_trial_user_attr(optuna_id, "status", status)

    def _intermediate(self, trial_id: str, result: dict) -> None:
        """The accuracy at the result's epoch, in the storage: `Trial.report` refuses multi-objective studies."""
        value = result.get(self._progress)
        if value is not None:
            self._storage.set_trial_intermediate_value(self._optuna_id(trial_id), int(result["epoch"]), float(value))

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
        self._mirror.sync(self._storage, STUDY_NAME)
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


class DefineByRun:
    """The space as a define-by-run function of an Optuna trial (a class: the searcher pickles it)."""

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
