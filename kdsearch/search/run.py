"""The distributed search: Ray Tune runs the trials, Optuna (multi-objective) chooses them.

`run_search` is the entry point; `_Search` builds and runs its Ray Tune experiments. The parts
are adapters around plain pieces:

    SearchSpace.suggest   -> DefineByRun, asked by KdsearchSearcher over Optuna's ask and tell     searcher.py
    run_trial             -> SearchTrainable, the trainable (reports through ray.tune.report)      trainable.py
    ParetoHalvingRule     -> ParetoHalving, a Ray Tune TrialScheduler                              scheduler.py
    results tables        -> ResultsRecorder, a Ray Tune Callback writing Parquet atomically       callbacks.py
    status rendering      -> LiveView, a Ray Tune Callback drawing a rich live view                callbacks.py

Ray's session (joining or starting Ray, its loggers) is ray_session.py; the run folder's life
(creating, checking, the inputs loaded once) is run_folder.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.error import TuneError

from kdsearch.errors import KdsearchError
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths, write_json
from kdsearch.search.callbacks import LiveView, ResultsRecorder
from kdsearch.search.early_stopping import ParetoHalvingRule
from kdsearch.search.oneshot import enqueue_kept, run_oneshot
from kdsearch.search.ray_session import (
    TUNE_ADVICE,
    check_local_gpus,
    check_reachable,
    cluster_address,
    one_line_sync_errors,
    quiet,
    ray_session,
    reuse_on,
    switched,
    trial_slots,
)
from kdsearch.search.run_folder import (
    earlier_trials,
    load_data_and_teacher,
    prepare_run,
)
from kdsearch.search.scheduler import ParetoHalving
from kdsearch.search.searcher import KdsearchSearcher
from kdsearch.search.tracker_backends import TrackedRun
from kdsearch.search.trackers import TrackingCallback, check_installed, parse_track, search_summary
from kdsearch.search.trainable import SearchTrainable
from kdsearch.search.warm_start import add_earlier_trials, enqueue_configs
from kdsearch.space.file import load_space
from kdsearch.space.objectives import accuracy_and_cost
from kdsearch.space.samplers import TPE_SLOW_AFTER, make_sampler
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import SEED_MAX
from kdsearch.storage import Storage, StorageError


@dataclass
class SearchResult:
    """What a search returns: its run, every recorded trial, the front, whether it stopped early."""

    paths: RunPaths
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    interrupted: bool
    grid: Any = None  # Ray Tune's ResultGrid


def run_search(
    space_file: str | os.PathLike,
    *,
    trials: int | None = None,
    address: str | None = None,
    name: str | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = False,
    from_run: str | os.PathLike | None = None,
    console: Any = None,
    say: Callable[[str], None] = print,
    reuse_actors: bool | None = None,
    trial: Callable[..., None] | None = None,
    track: Sequence[str] | None = None,
) -> SearchResult:
    """Run (or resume, or extend) a search.

    Args:
        space_file: the space file (search_spaces/NAME.yaml).
        trials: the run's total (default: the space's `search.trials`); on `resume`, above the
            run's total it extends the run (a finished one too), rerunning none.
        address: the Ray cluster to join (`ray_session.cluster_address`); else the embedded Ray.
        name: the run's name under `storage` (default: the space's name).
        storage: where runs live: a local or NFS path, or a URI (s3://, gs://, any pyarrow
            filesystem); the run is `storage/name`, the teacher-logit cache `storage/cache`.
        resume: continue the run whose driver died.
        from_run: (a new run only) start the sampler from an earlier run's trials of the same
            data, as if this search had run them (kdsearch.search.warm_start).
        console: a rich Console for the live view; `say` gets the one-line messages.
        reuse_actors: keep a trial's worker for the next trial (default: `reuse_on`); False,
            Ray's default, is a benchmarks' baseline: every trial loads imports and data afresh.
        trial: (benchmarks only) replaces training in the workers: `noop_trial` reports epochs
            at once, so a benchmark measures the driver's own cost; no data or teacher loads.
        track: the experiment trackers each trial is logged to (kdsearch.search.trackers;
            default: the space's `search.track`).

    Returns:
        The run, its trials table, its front, and whether it stopped before its total.
    """
    space_file = Path(space_file)
    space = load_space(space_file)
    root, address, trackers = _checked(space, storage, address, track)
    earlier = earlier_trials(from_run) if from_run is not None else None
    paths = RunPaths(root.child(name or space.name))
    meta = prepare_run(space_file, space, paths, resume, trials, address, None if from_run is None else str(from_run))
    total = trials or int(meta["trials"])

    with ray_session(address, say):  # Ray's environment switches too, only until it returns
        loaded = load_data_and_teacher(space, root.child("cache"), say) if trial is None else (None, None, None)
        trainable = SearchTrainable.of(space, paths, loaded, trial)
        reuse = reuse_on(address) if reuse_actors is None else reuse_actors
        search = _Search(space, paths, meta, console, say, reuse, trainable)
        search.track = trackers
        if space.search.strategy == "oneshot" and trial is None:  # stages 1 and 2; the training is this search
            search.kept = run_oneshot(space, paths, loaded, total, say)
        return search.start(total, earlier) if not resume else search.resume(total)


def _checked(
    space: SearchSpace, storage: str | os.PathLike | None, address: str | None, track: Sequence[str] | None
) -> tuple[Storage, str | None, tuple[str, ...]]:
    """What a search needs, checked before Ray starts (each problem one line): the storage, the
    cluster (or the local GPUs), the trackers' packages; returns the storage's root, the cluster's
    address (None: a local Ray) and the trackers."""
    from kdsearch.train.faults import hang_grace_minutes

    hang_grace_minutes()  # a bad KDSEARCH_HANG_GRACE_MINUTES: one line here, not in every trial
    root = Storage.open(storage or "runs")
    root.check_writable()  # a bucket that does not exist or refuses writes: one line, before anything runs
    address = cluster_address(address)
    if address:
        check_reachable(address)
    else:
        check_local_gpus(space.resources.gpus)
    trackers = parse_track(track) if track else space.search.track
    check_installed(trackers)  # a tracker's package missing: one line
    return root, address, trackers


class _Search:
    """One run's Ray Tune experiments: the first, a resumed one, and extensions (each a Tune
    experiment of its own in the run's storage, named in run.json's "tune")."""

    def __init__(
        self,
        space: SearchSpace,
        paths: RunPaths,
        meta: dict[str, Any],
        console: Any,
        say: Callable[[str], None],
        reuse_actors: bool,
        trainable: SearchTrainable,
    ):
        self.space, self.paths, self.meta, self.console, self.say = space, paths, meta, console, say
        self.reuse_actors, self.trainable = reuse_actors, trainable
        self._view: LiveView | None = None  # the running experiment's live view, if any
        self._recorder: ResultsRecorder | None = None  # the new experiment's (a restored one brings its own)
        self.track: tuple[str, ...] = ()  # the experiment trackers (kdsearch.search.trackers)
        self.kept: list[dict[str, Any]] | None = None  # oneshot: the screened students, in training order

    def start(self, total: int, earlier: list[dict[str, Any]] | None) -> SearchResult:
        if self.space.search.sampler == "tpe" and total > TPE_SLOW_AFTER:
            self.say(
                f"search.sampler tpe: each suggestion takes longer as trials accumulate (Optuna's TPE reads them "
                f"all: about 0.5 s each at 10,000 on 2 cores); nsga2 stays flat for {total:,} trials"
            )
        searcher = self._searcher(total, self.space.search.seed)
        queued = enqueue_configs(searcher.study, self.space)
        if queued:
            self.say(f"{queued} enqueued configs run first (search.enqueue)")
        if self.kept is not None:
            self.say(
                f"training: the {enqueue_kept(searcher.study, self.space, self.kept, [])} screened students run first"
            )
        if earlier is not None:
            warm = add_earlier_trials(
                searcher.study, self.space, earlier, self.space.objectives, searcher.study.sampler
            )
            self.say(warm.describe(str(self.meta["from"])))
        return self._fit(self._tuner(searcher, total, RunPaths.TUNE), total)

    def resume(self, total: int) -> SearchResult:
        """Continue the run: a new experiment warm-started from every recorded trial, up to the
        run's own total (or `total`, when above it).

        NOTE: Ray Tune's saved experiment is not restored; the recorded trials are the run's
        state. Tune's state reaches a remote storage after the trial checkpoints it names can be
        rotated away, so a driver killed in between leaves a trial that Tune, with no failure
        limit, retries forever; and a restored experiment ran one trial past its total on S3
        (both met by tests/test_storage_s3.py's SIGKILL test). Every recorded trial is kept, the
        sampler starts from them, and a trial that was running starts again as a new one.
        """
        experiment = self.meta.get("tune", RunPaths.TUNE)
        recorded = self.paths.rows(RunPaths.TRIALS)
        if len(recorded) < int(self.meta["trials"]):  # the run has trials left to run
            store = self.paths.store
            restorable = tune.Tuner.can_restore(store.path(experiment), storage_filesystem=store.fs)
            if not restorable and not (self.kept is not None and not recorded):  # oneshot: killed before training
                raise KdsearchError(
                    f"--resume: {store.uri_of(experiment)} holds no Ray Tune state (the search died before its first checkpoint); start it again"
                )
            self.say(f"resuming {self.paths.uri}: a new experiment starts from its {len(recorded)} recorded trials")
            return self._extend(max(total, int(self.meta["trials"])), recorded)
        if total <= len(recorded):
            self.say(f"{self.paths.uri} already has {len(recorded)} trials; --trials N above that extends it")
            return self._result(total, None)
        return self._extend(total, recorded)

    def _extend(self, total: int, recorded: list[dict[str, Any]]) -> SearchResult:
        current = str(self.meta.get("tune", RunPaths.TUNE))
        n = int(current.rpartition("-")[2]) if current != RunPaths.TUNE else 1  # experiments so far
        experiment = f"{RunPaths.TUNE}-{n + 1}"
        # a sampler seeded afresh for each extension: the first one's draws would repeat the run's start
        searcher = self._searcher(total, (self.space.search.seed + n) % (SEED_MAX + 1))
        warm = add_earlier_trials(searcher.study, self.space, recorded, self.space.objectives, searcher.study.sampler)
        if self.kept is not None:  # oneshot: the screened students no recorded trial trained
            self.say(
                f"training: the {enqueue_kept(searcher.study, self.space, self.kept, recorded)} screened students left run first"
            )
        self.meta.update(trials=total, tune=experiment)
        self.meta.pop("ended", None)  # the run goes on: `kdsearch status` counts its time again
        write_json(self.paths.store, RunPaths.META, self.meta)
        self.say(f"extending {self.paths.uri} from {len(recorded)} to {total} trials; {warm.describe('this run')}")
        return self._fit(self._tuner(searcher, total - len(recorded), experiment), total)

    def _searcher(self, total: int, seed: int) -> KdsearchSearcher:
        space = self.space
        settings = dataclasses.replace(space.search, seed=seed)
        return KdsearchSearcher(space, space.objectives, make_sampler(settings), run=self.paths, total=total)

    def _tune_trainable(self) -> Any:
        return self.trainable.for_tune(self.space.resources.cpus, self.space.resources.gpus)

    def _tuner(self, searcher: KdsearchSearcher, num_samples: int, experiment: str) -> tune.Tuner:
        space, store = self.space, self.paths.store
        acc, _ = accuracy_and_cost(space.objectives)
        costs = tuple(name for name, mode in space.objectives if mode == "min")
        recorder = self._recorder = ResultsRecorder(self.paths, searcher)
        callbacks: list[tune.Callback] = [recorder]
        if self.track:  # after the recorder: the trackers' summary reads the trials it recorded
            callbacks.append(self._tracking(recorder))
        self._view = None
        if self.console is not None:
            self._view = LiveView(recorder, space, searcher.total, float(self.meta["started"]), self.console)
            callbacks.append(self._view)
        return tune.Tuner(
            self._tune_trainable(),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=ParetoHalving(ParetoHalvingRule(space.early_stopping), acc, costs, self.paths),
                num_samples=num_samples,
                max_concurrent_trials=space.search.max_concurrent,
                reuse_actors=self.reuse_actors,  # warm workers: imports, data and teacher load once each
            ),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=store.path(),
                storage_filesystem=store.fs,
                # every failure is retried: each attempt counts the trial's own failures against the space's
                # max_failures and ends it past them; a lost node never counts (kdsearch.search.attempts)
                failure_config=tune.FailureConfig(max_failures=-1),
                # a trial's latest two checkpoints: storage stays bounded (the recorder keeps a stopped
                # trial's weights); Tune snapshots its experiment state every num_to_keep checkpoints
                # of a trial, so 2 halves those snapshots against 1
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
                verbose=0,
            ),
        )

    def _tracking(self, recorder: ResultsRecorder) -> TrackingCallback:
        """The trackers' callback: one tracker run per trial, under the run's own."""
        objectives = self.space.objectives
        run = TrackedRun(self.paths.name, self.space.name, self.paths.store, "tensorboard")
        summary = search_summary(lambda: list(recorder.trials.values()), self.paths, objectives)
        names = [n for n, _ in objectives]
        return TrackingCallback(self.track, run, "search", names, say=self.say, summary=summary)

    def _fit(self, tuner: tune.Tuner, total: int) -> SearchResult:
        t0 = time.time()
        try:
            with quiet(*TUNE_ADVICE), one_line_sync_errors(), self._pending_trials():
                grid = tuner.fit()  # SIGINT makes fit() return what finished, without raising
        except (StorageError, TuneError) as e:  # the recorder's flush or the searcher's read, out of Tune's loop
            # in Tune's trial-error handler a StorageError leaves fit() wrapped in a TuneError: the
            # recorder keeps the storage failure it raised, which is what the user is told
            failure = e if isinstance(e, StorageError) else getattr(self._recorder, "storage_failure", None)
            if failure is None:
                raise
            if self._view is not None:
                self._view.on_experiment_end([])  # the console back to normal before the line
            raise StorageError(self._storage_failed(failure)) from None
        # the experiment has returned (all trials done, or Ctrl-C): the run's end, for `kdsearch status`
        self.meta["ended"] = time.time()
        write_json(self.paths.store, RunPaths.META, self.meta)
        if self.kept is not None:
            self.say(
                f"training: {len(self.paths.rows(RunPaths.TRIALS))} of {total} trials recorded, {self.meta['ended'] - t0:.1f} s"
            )
        return self._result(total, grid)

    @contextlib.contextmanager
    def _pending_trials(self) -> Iterator[None]:
        """On a cluster, as many trials pending as the cluster has room for now, while Tune runs.

        NOTE: with a searcher and no `search.max_concurrent`, Ray Tune 2.60 keeps one trial pending
        (tune_controller.py `_get_max_pending_trials`), so trials start one after another; a fresh
        worker per trial (`reuse_on`) then takes seconds each to fill a cluster. Tune reads
        TUNE_MAX_PENDING_TRIALS_PG when fit() builds its controller; one the user set is kept
        (tests/test_gpu_scheduling.py
        test_trials_share_declared_gpus_train_data_parallel_and_the_cache_runs_on_gpu_nodes: two
        trials at once on one GPU).
        """
        if self.reuse_actors or self.space.search.max_concurrent or "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
            yield
            return
        slots = trial_slots(self.space.resources, ray.cluster_resources())
        with switched({"TUNE_MAX_PENDING_TRIALS_PG": str(slots)}):
            yield

    def _storage_failed(self, error: StorageError) -> str:
        """The one line a storage failure stops the search with: what failed and where, that the
        tables are the last whole ones (each written whole, then renamed), and how to continue."""
        root = self.paths.store.parent.uri
        command = (
            f"kdsearch search {self.meta.get('space_file', 'SPACE')} --storage {root} --name {self.paths.name} --resume"
        )
        return (
            f"{error}; the search stopped: {self.paths.uri}'s tables hold the last whole state; "
            f"once the storage is back, continue with: {command}"
        )

    def _result(self, total: int, grid: Any) -> SearchResult:
        rows = self.paths.rows(RunPaths.TRIALS)
        return SearchResult(
            self.paths, rows, front_rows(rows, self.space.objectives), interrupted=len(rows) < total, grid=grid
        )
