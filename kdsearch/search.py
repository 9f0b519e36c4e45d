"""The distributed search: Ray Tune runs the trials, Optuna (multi-objective) chooses them.

The only module (with the CLI) that imports Ray. Its parts are adapters around plain pieces:

    SearchSpace.suggest   -> the define-by-run space of Ray's OptunaSearch (budgets as constraints)
    run_trial             -> the function trainable (reports through ray.tune.report)
    ParetoHalvingRule     -> ParetoHalving, a Ray Tune TrialScheduler
    results tables        -> ResultsRecorder, a Ray Tune Callback writing Parquet atomically
    status rendering      -> LiveView, a Ray Tune Callback drawing a rich live view

A run directory holds the space as run (space.yaml), run.json, trials.parquet, epochs.parquet,
the Optuna study (study.db, SQLite: `optuna-dashboard sqlite:///study.db`), Ray Tune's
experiment state (tune/), the teacher-logit cache (cache/) and each trial's weights (trials/ID/).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdsearch import __version__
from kdsearch import objectives as objective_table
from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.early_stopping import ParetoHalvingRule
from kdsearch.errors import KdsearchError
from kdsearch.objectives import Pairs, accuracy_and_cost, values_for_sampler
from kdsearch.outcomes import OPTUNA_STATE, Status, status_of
from kdsearch.pareto import front_rows
from kdsearch.results import EPOCH_COLUMNS, TRIAL_COLUMNS, RunPaths, read_rows, write_json, write_table
from kdsearch.samplers import make_sampler
from kdsearch.space import SearchSpace
from kdsearch.space_file import load_space
from kdsearch.specs import TeacherSource, TrialSpec
from kdsearch.status import render_status

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SearchResult:
    paths: RunPaths
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    interrupted: bool
    grid: Any = None  # Ray Tune's ResultGrid


# --------------------------------------------------------------------------------------
# The trainable (runs in Ray workers)
# --------------------------------------------------------------------------------------


def _trainable(
    config: dict[str, Any],
    run_dir: str,
    data: Any,
    cached_logits: Any,
    threads: int,
    objectives: Pairs,
    measured: tuple,
) -> None:
    """One Ray Tune trial: an infeasible config reports at once (its exact costs, and the
    worst value of what it never measured); the rest run `run_trial`.

    `data`, `cached_logits` and the run's measured objectives (their definitions) are the
    driver's, through the object store (tune.with_parameters): a measured objective a user
    registered in the driver needs no registration in the worker.
    """
    import torch

    from kdsearch.trial import run_trial

    torch.set_num_threads(threads)
    meta = config["kdsearch"]
    spec = TrialSpec.from_dict(meta["spec"])
    if meta["infeasible"]:
        # over the budget: never trains; Optuna already holds its constraint values
        computed = objective_table.computed(spec.student)
        never_trained = dict(zip([name for name, _ in objectives], values_for_sampler(computed, objectives)))
        tune.report({"epoch": 0, **computed, **never_trained})
        return
    trial_id = tune.get_context().get_trial_id()
    run_trial(
        spec,
        tune.report,
        RunPaths(Path(run_dir)).trial_dir(trial_id),
        data=data,
        cached_logits=cached_logits,
        objectives=measured,
        loader_workers=max(0, threads - 1),  # the trial's other CPUs decode images (unused for in-memory digits)
    )


def outcome(config: dict[str, Any], last_result: dict[str, Any] | None, errored: bool = False) -> Status:
    """How a Tune trial ended (kdsearch.outcomes' rule, from the facts its config holds)."""
    meta = config["kdsearch"]
    return status_of(meta["infeasible"], int(meta["spec"]["train.epochs"]), last_result, errored)


# --------------------------------------------------------------------------------------
# Optuna, as Ray's searcher
# --------------------------------------------------------------------------------------


class KdsearchOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, with early-stopped trials entering the study as PRUNED (not as
    finished with an early-epoch accuracy), failed ones as FAIL, and the study mirrored to a
    SQLite file in the run directory for optuna-dashboard."""

    def __init__(self, *args: Any, study_path: str, trials_path: str, total: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._study_path = study_path
        self._trials_path = trials_path
        self._total = total
        self._last_export = 0.0
        self._configs: dict[str, dict[str, Any]] = {}  # trial id -> config (saved with the searcher)

    @property
    def objectives(self) -> Pairs:
        return list(zip(self._metric, self._mode))

    def suggest(self, trial_id: str) -> dict | str | None:
        """Ask Optuna for a config, reconciling with trials.parquet after a resume.

        Ray saves the searcher's state every few seconds, so a driver killed with SIGKILL can
        come back without trials that finished after the last save; trials.parquet still has
        them. They count toward the requested total (FINISHED once it is reached), and when the
        restored sampler proposes one of their configs again, that trial is told its recorded
        outcome and a fresh config is asked for: no config runs twice.
        """
        if trial_id in self._ot_trials:
            return super().suggest(trial_id)
        recorded = {r["trial_id"]: r for r in read_rows(Path(self._trials_path))}
        if len(set(recorded) | set(self._ot_trials)) >= self._total:
            return Searcher.FINISHED
        lost = {tid: r for tid, r in recorded.items() if tid not in self._ot_trials}
        while True:
            config = super().suggest(trial_id)
            spec = config["kdsearch"]["spec"]
            match = next((tid for tid, r in lost.items() if all(r.get(k) == v for k, v in spec.items())), None)
            if match is None:
                self._configs[trial_id] = config
                return config
            row = lost.pop(match)
            ot_trial = self._ot_trials.pop(trial_id)
            self._tell(ot_trial, Status(row["status"]), row)
            self._ot_trials[match] = ot_trial
            self._completed_trials.add(match)
            if len(set(recorded) | set(self._ot_trials)) >= self._total:
                return Searcher.FINISHED

    def _tell(self, ot_trial: Any, status: Status, result: dict[str, Any] | None) -> None:
        """Tell Optuna how a trial ended (kdsearch.outcomes' mapping to its states)."""
        state = optuna.trial.TrialState[OPTUNA_STATE[status]]
        if state is optuna.trial.TrialState.COMPLETE:
            self._ot_study.tell(ot_trial, values_for_sampler(result or {}, self.objectives))
        else:
            self._ot_study.tell(ot_trial, state=state)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._tell(self._ot_trials[trial_id], outcome(self._configs[trial_id], result, error), result)
        self._completed_trials.add(trial_id)
        if time.monotonic() - self._last_export > 10:
            self.export_study()

    def export_study(self) -> None:
        """Copy the in-memory study to study.db (written beside, then renamed)."""
        self._last_export = time.monotonic()
        with atomic_path(self._study_path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tmp.unlink(missing_ok=True)  # a copy left by a killed driver
            optuna.copy_study(
                from_study_name=self._ot_study.study_name,
                from_storage=self._ot_study._storage,
                to_storage=f"sqlite:///{tmp}",
                to_study_name="kdsearch",
            )

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


# --------------------------------------------------------------------------------------
# Early stopping, as a Ray Tune scheduler
# --------------------------------------------------------------------------------------


class ParetoHalving(FIFOScheduler):
    """Stops a trial at a milestone when enough cheaper-or-equal trials are already more
    accurate at the same epoch (see kdsearch.early_stopping). Trials start in FIFO order."""

    def __init__(self, rule: ParetoHalvingRule, accuracy: str, costs: tuple[str, ...], epochs_file: str):
        super().__init__()
        self.rule, self.accuracy, self.costs = rule, accuracy, costs
        self._epochs_file = epochs_file
        self._seeded = False

    def _seed_from_file(self) -> None:
        """After a resume, milestones reached before the driver died still count as peers."""
        self._seeded = True
        for row in read_rows(Path(self._epochs_file)):
            if row.get("epochs_total") and self.rule.is_milestone(row["epoch"], row["epochs_total"]):
                if all(row.get(c) is not None for c in self.costs):
                    self.rule.record(
                        row["trial_id"], row["epoch"], tuple(row[c] for c in self.costs), row[self.accuracy]
                    )

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self._seeded:
            self._seed_from_file()
        meta = trial.config["kdsearch"]
        if meta["infeasible"] or not result.get("epoch"):
            return TrialScheduler.CONTINUE
        stop = self.rule.on_result(
            trial.trial_id,
            result["epoch"],
            int(meta["spec"]["train.epochs"]),
            tuple(float(result[c]) for c in self.costs),
            float(result[self.accuracy]),
        )
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE


# --------------------------------------------------------------------------------------
# Results and progress, as Ray Tune callbacks (they run in the driver)
# --------------------------------------------------------------------------------------


class ResultsRecorder(tune.Callback):
    """Keeps trials.parquet and epochs.parquet up to date, keyed by trial id (idempotent)."""

    def __init__(self, paths: RunPaths, searcher: KdsearchOptunaSearch, flush_seconds: float = 2.0):
        self.paths = paths
        self.searcher = searcher
        self.flush_seconds = flush_seconds
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self.retries: dict[str, int] = {}
        self._last_flush = 0.0

    def setup(self, **info: Any) -> None:
        self.trials = {r["trial_id"]: r for r in read_rows(self.paths.trials)}
        self.epochs = {(r["trial_id"], r["epoch"]): r for r in read_rows(self.paths.epochs)}
        self.retries = {r["trial_id"]: r.get("retries") or 0 for r in self.trials.values()}

    @property
    def _metrics(self) -> list[str]:
        """What a row holds of a result: the run's objectives and every computed one."""
        names = [name for name, _ in self.searcher.objectives]
        return names + [o for o in objective_table.names("computed") if o not in names]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.config["kdsearch"]["infeasible"] or not result.get("epoch"):
            return
        tid = trial.trial_id
        if result["epoch"] == 1:  # a new attempt (first run or a retry): drop the old curve
            self.epochs = {k: v for k, v in self.epochs.items() if k[0] != tid}
            self.trials.pop(tid, None)
        row = {c: result.get(c) for c in (*EPOCH_COLUMNS, *self._metrics)}
        row.update(trial_id=tid, time=time.time(), epochs_total=int(trial.config["kdsearch"]["spec"]["train.epochs"]))
        self.epochs[(tid, result["epoch"])] = row
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial, outcome(trial.config, trial.last_result))
        self.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial, Status.FAILED, error=_error_text(trial))
        self.flush()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune retries (up to the space's max_failures)."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        log.warning("trial %s failed (%s); retrying", trial.trial_id, _error_text(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()
        try:
            self.searcher.export_study()
        except Exception as e:  # the dashboard copy must never fail the search
            log.warning("could not export the Optuna study: %s", e)

    def _row(self, trial: Any, status: Status, error: str | None = None) -> None:
        meta = trial.config["kdsearch"]
        spec = TrialSpec.from_dict(meta["spec"])
        computed = objective_table.computed(spec.student)  # exact whatever happened
        last = trial.last_result or {}
        tid = trial.trial_id
        curve = [r["val_acc"] for (t, _), r in self.epochs.items() if t == tid]
        ckpt = self.paths.trial_dir(tid) / "model.safetensors"
        self.trials[tid] = {
            "trial_id": tid,
            "status": status.value,
            # what training measured, only where the trial trained (never an infeasible trial's placeholder)
            **{m: computed[m] if m in computed else last.get(m) if status.measured else None for m in self._metrics},
            "best_val_acc": max(curve) if curve else None,
            "epochs": int(last.get("epoch", 0) or 0) if status is not Status.FAILED else len(curve),
            "epochs_total": spec.train.epochs,
            "wall_seconds": float(last.get("time_total_s", 0.0) or 0.0),
            "checkpoint": str(ckpt) if status is Status.COMPLETED and ckpt.exists() else None,
            "error": error,
            "retries": self.retries.get(tid, 0),
            "optuna_trial": meta.get("optuna_trial"),
            "finished_at": time.time(),
            **spec.to_dict(),
        }

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        write_table(sorted(self.trials.values(), key=lambda r: r["trial_id"]), self.paths.trials, TRIAL_COLUMNS)
        write_table(
            sorted(self.epochs.values(), key=lambda r: (r["trial_id"], r["epoch"])), self.paths.epochs, EPOCH_COLUMNS
        )


def _error_text(trial: Any) -> str:
    """The exception line of a failed trial's error file (what the user needs to see)."""
    try:
        text = Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return str(getattr(trial, "error_msg", "") or "unknown error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "Diverged" in line:
            return line[:500]
    return (lines[-1] if lines else "unknown error")[:500]


class LiveView(tune.Callback):
    """A rich live view on the console it is given: trials done/running/failed/stopped, the
    front so far, times."""

    def __init__(self, recorder: ResultsRecorder, space: SearchSpace, total: int, started: float, console: Any):
        self.recorder, self.space, self.total, self.started = recorder, space, total, started
        self.console = console
        self._live = None
        self._last = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None, "console": None}

    def setup(self, **info: Any) -> None:
        from rich.live import Live

        if self.console is not None:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.start()

    def on_step_end(self, iteration: int, trials: list, force: bool = False, **info: Any) -> None:
        if self._live is None or (not force and time.monotonic() - self._last < 1.0):
            return
        self._last = time.monotonic()
        running = sum(1 for t in trials if t.status == "RUNNING")
        self._live.update(
            render_status(
                list(self.recorder.trials.values()),
                list(self.recorder.epochs.values()),
                self.space.objectives,
                self.total,
                self.started,
                running,
            )
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self.on_step_end(0, trials, force=True)
            self._live.stop()
            if not self._live.console.is_terminal:
                self._live.console.line()  # a file or pipe gets no newline after the last render
            self._live = None


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def _init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; LiveView shows progress
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KdsearchError(
                f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0][:200]}"
            ) from None
    else:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


def _prepare_run(
    space_file: Path, space: SearchSpace, paths: RunPaths, resume: bool, trials: int, address: str | None
) -> float:
    """Create (or check, on resume) the run directory; returns the run's start time."""
    text = Path(space_file).read_text()
    if resume:
        if not paths.meta.exists():
            raise KdsearchError(f"--resume: {paths.root} holds no run to resume; start it without --resume")
        meta = json.loads(paths.meta.read_text())
        if paths.space.exists() and paths.space.read_text() != text:
            raise KdsearchError(f"--resume: {space_file} differs from the space the run started with ({paths.space})")
        return float(meta["started"])
    if paths.meta.exists():
        raise KdsearchError(
            f"--name: a run already exists at {paths.root}; use --resume to continue it or another --name"
        )
    write_text_atomic(paths.space, text)
    started = time.time()
    write_json(
        paths.meta,
        {
            "name": paths.root.name,
            "space_file": str(Path(space_file).resolve()),
            "space_name": space.name,
            "trials": trials,
            "started": started,
            "address": address,
            "kdsearch": __version__,
            "objectives": [list(o) for o in space.objectives],
        },
    )
    return started


def _load_once(space: SearchSpace, paths: RunPaths, say: Callable[[str], None]):
    """Load the data and compute (or read) the teacher's logits once for the whole search.

    Both go to the workers through Ray's object store, so no worker loads the data or runs
    the teacher for the cache. The logits are None where unused or where augmentation is random.
    """
    from kdsearch.data import load_data
    from kdsearch.logit_cache import teacher_logits
    from kdsearch.teacher import load_teacher

    data = load_data(space)
    sources = space.teacher_sources(data.random_augment)
    if sources == {TeacherSource.NONE}:
        return data, None
    teacher = load_teacher(space, train_if_missing=True, log=say, data=data)  # trains the built-in one if missing
    if TeacherSource.CACHED not in sources:
        if TeacherSource.CACHED in space.teacher_sources(random_augment=False):
            say("training augmentation is random: trials run the teacher live (the logit cache is off)")
        return data, None
    t0 = time.perf_counter()
    logits, images = teacher_logits(teacher, data, space.teacher, paths.cache)
    if images:
        say(f"teacher logits cached once for the search: {images:,} images in {time.perf_counter() - t0:.1f} s")
    return data, logits


def run_search(
    space_file: str | os.PathLike,
    *,
    trials: int | None = None,
    address: str | None = None,
    name: str | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = False,
    console: Any = None,
    say: Callable[[str], None] = print,
    reuse_actors: bool = True,
) -> SearchResult:
    """Run (or resume) a search; returns the trials table and the front.

    `console` (a rich Console) gets a live view of the search; `say` its one-line messages.
    `reuse_actors=False` is Ray's default, kept as a baseline for benchmarks: every trial
    then pays a fresh worker's imports and data loading.
    """
    space_file = Path(space_file)
    space = load_space(space_file)
    storage_str = str(storage or "runs")
    if "://" in storage_str:
        raise KdsearchError(
            f"--storage {storage_str}: kdsearch writes its tables to a local or shared filesystem path; mount the bucket and give its path"
        )
    paths = RunPaths((Path(storage_str) / (name or space.name)).resolve())
    total = trials or space.search.trials
    started = _prepare_run(space_file, space, paths, resume, total, address)

    owns_ray = not ray.is_initialized()
    _init_ray(address)
    try:
        return _search(space, paths, total, started, resume, console, say, reuse_actors)
    finally:
        if owns_ray:
            ray.shutdown()


def _search(
    space: SearchSpace,
    paths: RunPaths,
    total: int,
    started: float,
    resume: bool,
    console: Any,
    say: Callable[[str], None],
    reuse_actors: bool,
) -> SearchResult:
    data, cached = _load_once(space, paths, say)

    acc, _ = accuracy_and_cost(space.objectives)
    costs = tuple(name for name, mode in space.objectives if mode == "min")
    searcher = KdsearchOptunaSearch(
        space=DefineByRun(space),
        metric=[name for name, _ in space.objectives],
        mode=[mode for _, mode in space.objectives],
        sampler=make_sampler(space.search),
        study_path=str(paths.study),
        trials_path=str(paths.trials),
        total=total,
    )
    scheduler = ParetoHalving(ParetoHalvingRule(space.early_stopping), acc, costs, str(paths.epochs))
    recorder = ResultsRecorder(paths, searcher)
    callbacks: list[tune.Callback] = [recorder]
    if console is not None:
        callbacks.append(LiveView(recorder, space, total, started, console))

    measured = tuple(
        objective_table.get(name) for name, _ in space.objectives if objective_table.get(name).source == "measured"
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable,
            run_dir=str(paths.root),
            data=data,
            cached_logits=cached,
            threads=max(1, int(space.resources.cpus)),
            objectives=space.objectives,
            measured=measured,
        ),
        {"cpu": space.resources.cpus, "gpu": space.resources.gpus},
    )
    if resume and tune.Tuner.can_restore(str(paths.tune)):
        tuner = tune.Tuner.restore(str(paths.tune), trainable=trainable, resume_unfinished=True, resume_errored=False)
        say(f"resuming {paths.root}")
    elif resume:
        raise KdsearchError(
            f"--resume: {paths.tune} holds no Ray Tune state (the search died before its first checkpoint); start it again"
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=total,
                max_concurrent_trials=space.search.max_concurrent,
                reuse_actors=reuse_actors,  # warm workers: imports, data and teacher load once each
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(paths.root),
                failure_config=tune.FailureConfig(max_failures=space.search.max_failures),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    grid = tuner.fit()  # SIGINT makes fit() return what finished, without raising
    rows = read_rows(paths.trials)
    return SearchResult(paths, rows, front_rows(rows, space.objectives), interrupted=len(rows) < total, grid=grid)
