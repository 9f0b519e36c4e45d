"""Ray Tune callbacks that run in the driver: the recorder keeps trials.parquet and
epochs.parquet up to date; the live view draws the run's status on a console."""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from kdsearch.results.hypervolume import run_reference
from kdsearch.results.outcomes import FAILURE, RETRY_REFUSED, Status
from kdsearch.results.parts import PartsWriter
from kdsearch.results.status import render_status
from kdsearch.results.tables import EPOCH_COLUMNS, MERGE_RULES, TRIAL_COLUMNS, RunPaths
from kdsearch.search.searcher import KdsearchSearcher, outcome
from kdsearch.space import objectives as objective_table
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TrialSpec
from kdsearch.storage import StorageError
from kdsearch.train.checkpoint import STUDENT_FILES

log = logging.getLogger(__name__)


def _keeps_storage_failure(hook: Callable) -> Callable:
    """A StorageError raised in one of the recorder's hooks is kept on the recorder: Tune's
    controller wraps what its result and error handlers raise in a TuneError (text only), and
    the search stops with the storage's own line (see the search's `_fit`)."""

    @functools.wraps(hook)
    def kept(self: ResultsRecorder, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except StorageError as e:
            self.storage_failure = e
            raise

    return kept


class ResultsRecorder(tune.Callback):
    """Keeps trials.parquet and epochs.parquet up to date, keyed by trial id (idempotent).

    Rows are appended as parts (kdsearch.results.parts): a trial's row when it ends, the
    epochs every `flush_seconds`; both tables are compacted into one file each when the
    search ends. In memory it holds each trial's row, the last epoch of
    each trial (what the live view shows) and the curves of the trials still running: never
    every epoch of the run."""

    def __init__(self, paths: RunPaths, searcher: KdsearchSearcher, flush_seconds: float = 2.0):
        self.paths = paths
        self.searcher = searcher
        self.flush_seconds = flush_seconds
        self.trials: dict[str, dict[str, Any]] = {}
        self.last_epochs: dict[str, dict[str, Any]] = {}  # trial id -> its latest epoch's row
        self._curves: dict[str, dict[int, float | None]] = {}  # running trials: epoch -> val_acc
        self.retries: dict[str, int] = {}
        self._pending_trials: list[dict[str, Any]] = []
        self._pending_epochs: list[dict[str, Any]] = []
        self._writers: dict[str, PartsWriter] = {}
        self._last_flush = 0.0
        self.storage_failure: StorageError | None = None
        self._told_no_cuda = False  # a trial given a GPU that torch cannot see: said once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_writers": {}}

    def setup(self, **info: Any) -> None:
        self.trials = {r["trial_id"]: r for r in self.paths.rows(RunPaths.TRIALS)}
        for r in self.paths.rows(RunPaths.EPOCHS):  # by trial, then epoch: read once, at the start
            self.last_epochs[r["trial_id"]] = r
            if r["trial_id"] not in self.trials:  # a trial resumed unfinished: its curve so far
                self._curves.setdefault(r["trial_id"], {})[r["epoch"]] = r.get("val_acc")
        self.retries = {r["trial_id"]: r.get("retries") or 0 for r in self.trials.values()}

    def _writer(self, name: str) -> PartsWriter:
        if name not in self._writers:
            first = TRIAL_COLUMNS if name == RunPaths.TRIALS else EPOCH_COLUMNS
            self._writers[name] = PartsWriter(self.paths.store, name, first, MERGE_RULES[name])
        return self._writers[name]

    @property
    def _metrics(self) -> list[str]:
        """What a row holds of a result: the run's objectives and every computed one."""
        names = [name for name, _ in self.searcher.objectives]
        return names + [o for o in objective_table.names("computed") if o not in names]

    @_keeps_storage_failure
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.config["kdsearch"]["infeasible"] or not result.get("epoch"):
            return
        tid, epoch = trial.trial_id, result["epoch"]
        if result.get("gpu_ids") and not result.get("gpu") and not self._told_no_cuda:
            self._told_no_cuda = True  # once a search: the worker says it once per process (train.trial.trial_device)
            log.warning(
                "trial %s was given GPU %s on node %s, where torch finds no CUDA device: it trains on the CPU",
                tid, result["gpu_ids"], str(result.get("node_id"))[:12],
            )  # fmt: skip
        # an attempt reports increasing epochs; a retry (from epoch 1, or from its last checkpoint's
        # epoch + 1) replaces the epochs it trains again (the tables' rule: latest_epochs), and a
        # trial that reports has not ended
        curve = self._curves.setdefault(tid, {})
        if curve and epoch <= max(curve):
            self._curves[tid] = curve = {k: v for k, v in curve.items() if k < epoch}
        self.trials.pop(tid, None)
        row = {c: result.get(c) for c in (*EPOCH_COLUMNS, *self._metrics)}
        row.update(trial_id=tid, time=time.time(), epochs_total=int(trial.config["kdsearch"]["spec"]["train.epochs"]))
        curve[epoch] = row.get("val_acc")
        self.last_epochs[tid] = row
        self._pending_epochs.append(row)
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    @_keeps_storage_failure
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # a trial's own fault (diverged, out of memory, past train.max_minutes), or its failures past the space's
        # max_failures, end it with the reason in its last result; the attempt that only said so was no retry
        last = trial.last_result or {}
        if last.get(RETRY_REFUSED):
            self.retries[trial.trial_id] = max(0, self.retries.get(trial.trial_id, 0) - 1)
        self._row(trial, outcome(trial.config, last), error=last.get(FAILURE))
        self.flush(epochs=False)

    @_keeps_storage_failure
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial, Status.FAILED, error=trial_error_text(trial))
        self.flush(epochs=False)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed attempt that Tune starts again (a lost node's, always; the trial's own, up to the space's
        max_failures: kdsearch.search.attempts)."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        log.warning("trial %s failed (%s); retrying", trial.trial_id, trial_error_text(trial))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """The search stops at the loop's next step once a hook met the storage failing. Tune's
        stop_trial swallows what a callback raises in it (it logs it and fails the trial, then
        retries it): without this, the search went on retrying trials against a storage it
        could not write for ~20 s (measured: the unreachable-bucket test)."""
        if self.storage_failure is not None:
            raise self.storage_failure

    @_keeps_storage_failure
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.storage_failure is not None:  # the search stops on it: the tables stay the last whole ones
            return
        self.flush()
        for name in (RunPaths.TRIALS, RunPaths.EPOCHS):  # each table one file again
            self._writer(name).compact()
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
        curve = [v for v in self._curves.pop(tid, {}).values() if v is not None]
        ckpt, ckpt_epoch = RunPaths.checkpoint(tid), None  # relative to the run
        if status is Status.COMPLETED and self.paths.store.exists(ckpt):  # the worker uploaded its final weights
            ckpt_epoch = spec.train.epochs
        elif status is Status.STOPPED_EARLY:  # its latest checkpoint's weights, copied beside
            ckpt_epoch = self._keep_checkpoint(trial)
        row = self.trials[tid] = {
            "trial_id": tid,
            "status": status.value,
            # what training measured, only where the trial trained (never an infeasible trial's placeholder)
            **{m: computed[m] if m in computed else last.get(m) if status.measured else None for m in self._metrics},
            "best_val_acc": max(curve) if curve else None,
            "epochs": int(last.get("epoch", 0) or 0) if status is not Status.FAILED else len(curve),
            "epochs_total": spec.train.epochs,
            "wall_seconds": float(last.get("time_total_s", 0.0) or 0.0),
            "checkpoint": ckpt if ckpt_epoch is not None else None,
            "checkpoint_epoch": ckpt_epoch,
            "error": error,
            "retries": self.retries.get(tid, 0),
            "optuna_trial": meta.get("optuna_trial"),
            "finished_at": time.time(),
            # where it ran: Ray's node id and Tune's hostname, the GPU's model ("" on CPU), Ray's ids of the
            # GPUs it held ("0,1"; "" for none: with gpu "" too, it trained on the CPU), its processes
            "node_id": last.get("node_id"),
            "host": last.get("hostname"),
            "gpu": last.get("gpu"),
            "gpu_ids": last.get("gpu_ids"),
            "world_size": last.get("world_size"),
            **spec.to_dict(),
        }
        self._pending_trials.append(row)

    def _keep_checkpoint(self, trial: Any) -> int | None:
        """Copy the weights and spec of a stopped trial's latest Tune checkpoint (tune/TRIAL/checkpoint_N,
        which Tune deletes with its run) to trials/ID/, where export reads a trial's weights;
        returns the checkpoint's epoch (None when the trial saved none)."""
        saved = trial.latest_checkpoint_result
        if saved is None or saved.checkpoint is None:
            return None
        ckpt, rel = saved.checkpoint, RunPaths.trial_dir(trial.trial_id)
        try:
            for name in STUDENT_FILES:  # the weights last: their presence means complete
                with ckpt.filesystem.open_input_stream(posixpath.join(ckpt.path, name)) as f:
                    self.paths.store.write_bytes(f"{rel}/{name}", f.read())
        except OSError as e:
            log.warning("trial %s: could not keep its checkpoint's weights (%s)", trial.trial_id, e)
            return None
        return int(saved.metrics["epoch"])

    def flush(self, epochs: bool = True) -> None:
        """Append what arrived since the last flush: the epochs, then the trials that ended.

        A trial's row is written when it ends (resume reconciles from it: see the searcher's
        `suggest`); the epochs every `flush_seconds` (`epochs=False` leaves them for then),
        so a driver killed loses at most that much of the curves."""
        if epochs:
            self._last_flush = time.monotonic()
            pending, self._pending_epochs = self._pending_epochs, []
            self._writer(RunPaths.EPOCHS).append(pending)
        trials, self._pending_trials = self._pending_trials, []
        self._writer(RunPaths.TRIALS).append(trials)


def trial_error_text(trial: Any) -> str:
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
    front so far and its hypervolume (against the run's reference point, from run.json), times."""

    def __init__(self, recorder: ResultsRecorder, space: SearchSpace, total: int, started: float, console: Any):
        self.recorder, self.space, self.total, self.started = recorder, space, total, started
        self.console = console
        self._live = None
        self._last = 0.0
        self._every = 1.0  # seconds between two drawings
        self.reference: dict[str, float] = {}
        self._why_no_reference = ""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None, "console": None}

    def setup(self, **info: Any) -> None:
        from rich.live import Live

        self.reference, self._why_no_reference = run_reference(
            self.recorder.paths, self.recorder.paths.meta(), self.space.objectives
        )
        if self.console is not None:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.start()

    def on_step_end(self, iteration: int, trials: list, force: bool = False, **info: Any) -> None:
        if self._live is None or (not force and time.monotonic() - self._last < self._every):
            return
        start = self._last = time.monotonic()
        running = sum(1 for t in trials if t.status == "RUNNING")
        self._live.update(
            render_status(
                list(self.recorder.trials.values()),
                list(self.recorder.last_epochs.values()),
                self.space.objectives,
                self.total,
                self.started,
                running,
                reference=self.reference,
                why_no_reference=self._why_no_reference,
            )
        )
        # once a second, or less often when drawing takes longer (58 ms at 10,000 trials on 2
        # busy cores): at most a twentieth of the driver's time
        self._every = max(1.0, 20 * (time.monotonic() - start))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self.on_step_end(0, trials, force=True)
            self._live.stop()
            if not self._live.console.is_terminal:
                self._live.console.line()  # a file or pipe gets no newline after the last render
            self._live = None
