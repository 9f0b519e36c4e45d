"""The distributed search: Ray Tune runs the trials, Optuna (multi-objective) chooses them.

`run_search` is the entry point. The parts are adapters around plain pieces:

    SearchSpace.suggest   -> DefineByRun, the space of Ray's OptunaSearch (budgets as constraints)  searcher.py
    run_trial             -> the function trainable (reports through ray.tune.report)             here
    ParetoHalvingRule     -> ParetoHalving, a Ray Tune TrialScheduler                              scheduler.py
    results tables        -> ResultsRecorder, a Ray Tune Callback writing Parquet atomically       callbacks.py
    status rendering      -> LiveView, a Ray Tune Callback drawing a rich live view                callbacks.py

A run directory holds the space as run (space.yaml), run.json, trials.parquet, epochs.parquet,
the Optuna study (study.db, SQLite: `optuna-dashboard sqlite:///study.db`), Ray Tune's
experiment state with each trial's latest checkpoint (tune/), the teacher-logit cache (cache/)
and each completed or early-stopped trial's weights (trials/ID/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayTaskError
from ray.tune.error import TuneError

from kdsearch import __version__
from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import FAILURE, RETRY_REFUSED
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths, write_json
from kdsearch.search.attempts import Attempts
from kdsearch.search.callbacks import LiveView, ResultsRecorder
from kdsearch.search.early_stopping import ParetoHalvingRule
from kdsearch.search.scheduler import ParetoHalving
from kdsearch.search.searcher import DefineByRun, KdsearchOptunaSearch
from kdsearch.search.warm_start import add_earlier_trials, enqueue_configs
from kdsearch.space import objectives as objective_table
from kdsearch.space.file import load_space
from kdsearch.space.objectives import Pairs, accuracy_and_cost, values_for_sampler
from kdsearch.space.samplers import TPE_SLOW_AFTER, make_sampler
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TeacherSource, TrialSpec
from kdsearch.storage import Storage, StorageError, first_line


@dataclass
class SearchResult:
    paths: RunPaths
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    interrupted: bool
    grid: Any = None  # Ray Tune's ResultGrid


def _trainable(
    config: dict[str, Any],
    run: RunPaths,
    data: Any,
    cached_logits: Any,
    teacher: Any,
    threads: int,
    objectives: Pairs,
    measured: tuple,
    world_size: int = 1,
    checkpoint_every: int = 0,
    max_failures: int = 0,
    trial: Callable[..., None] | None = None,
) -> None:
    """One Ray Tune trial: an infeasible config reports at once (its exact costs, and the
    worst value of what it never measured); the rest run `run_trial` in a local temporary
    folder and upload the weights to the run's storage (no node needs the driver's disk).

    Every `checkpoint_every` epochs the trial's report carries a checkpoint, which Tune
    copies to the run's storage (tune/TRIAL/checkpoint_N, the latest kept); a retried or
    resumed trial gets it back from `tune.get_checkpoint()` and continues after its epoch.

    `data`, `cached_logits`, the teacher's weights (`ShippedTeacher`, when some trial runs it
    live) and the run's measured objectives (their definitions) are the driver's, through the
    object store (tune.with_parameters): a measured objective a user registered in the driver
    needs no registration in the worker.

    `trial`, when given, is called as `trial(spec, report)` instead of training (see `noop_trial`).
    """
    import torch

    from kdsearch.train.faults import TrialFault, Watchdog, hang_grace_minutes
    from kdsearch.train.trial import run_trial, trial_device

    torch.set_num_threads(threads)
    meta = config["kdsearch"]
    spec = TrialSpec.from_dict(meta["spec"])
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]  # Ray's ids of the GPUs this trial holds (a fraction: shared)
    device = trial_device(gpu_ids)  # CUDA, or the CPU with one line per process when torch sees none
    where = {  # where it runs, in every report: Ray's node, Ray's GPU ids, torch's device name ("" on the CPU)
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(gpu_ids),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
    }
    computed = objective_table.computed(spec.student)
    never_trained = dict(zip([name for name, _ in objectives], values_for_sampler(computed, objectives)))
    untrained = {"epoch": 0, **computed, **never_trained, **where}  # the result of a trial that ends untrained
    if meta["infeasible"]:
        # over the budget: never trains; Optuna already holds its constraint values
        tune.report(untrained)
        return
    if trial is not None:
        trial(spec, lambda metrics: tune.report({**metrics, **where}))
        return
    trial_id = tune.get_context().get_trial_id()
    attempts = Attempts(run.store, trial_id)
    try:
        own = attempts.begin(where["node_id"], ray.get_runtime_context().get_job_id())
    except StorageError as e:  # a retry could not be counted against max_failures: none is made
        tune.report({**untrained, FAILURE: f"cannot record its attempt: {e}"})
        return
    if len(own) > max_failures:  # past the space's max_failures: the trial fails, with the last reason
        tune.report({**untrained, FAILURE: own[-1], RETRY_REFUSED: True})
        return

    def report(metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        saved = tune.Checkpoint.from_directory(checkpoint) if checkpoint is not None else None
        tune.report({**metrics, **where}, checkpoint=saved)

    try:
        require_data_here(data.spec, where["node_id"])
        limit, grace = spec.train.max_minutes, hang_grace_minutes()
        guard = (
            Watchdog((limit + grace) * 60, lambda why: _end_hung_worker(attempts, trial_id, why), _hung(limit, grace))
            if limit is not None
            else contextlib.nullcontext()
        )
        with tempfile.TemporaryDirectory(prefix=f"kdsearch-{trial_id}-") as workdir, guard:
            try:
                run_trial(
                    spec,
                    report,
                    workdir,
                    data=data,
                    teacher=teacher.build() if teacher is not None else None,
                    cached_logits=cached_logits,
                    device=device,
                    objectives=measured,
                    loader_workers=max(0, threads - 1),  # the trial's other CPUs decode images (unused for digits)
                    world_size=world_size,  # N >= 2 GPUs: one process each (kdsearch.train.parallel)
                    checkpoint_every=checkpoint_every,
                    resume_from=_restored_checkpoint(Path(workdir) / "restored"),
                )
            except TrialFault as e:
                # its own fault (diverged, out of memory, past train.max_minutes): the same config would fail
                # again, so the trial ends here with the reason in its last result (kdsearch.results.outcomes:
                # failed) instead of raising, which would be retried up to max_failures times
                tune.report({**untrained, FAILURE: e.line()})
                return
            for name in ("trial_spec.json", "model.safetensors"):  # the weights last: their presence means complete
                run.store.upload(Path(workdir) / name, f"{RunPaths.trial_dir(trial_id)}/{name}")
    except Exception as e:
        with contextlib.suppress(StorageError):  # uncounted, it is the next attempt's to judge (attempts.py)
            attempts.fail(f"{type(e).__name__}: {first_line(e)}")
        raise


def noop_trial(spec: TrialSpec, report: Callable[[dict[str, Any]], None]) -> None:
    """A trial that trains nothing: it reports each of its epochs at once, with the student's
    exact costs and an accuracy made up from them. `run_search(..., trial=noop_trial)` runs the
    whole search loop (searcher, scheduler, recorder, study mirror) around it, so what is
    measured is the driver alone (benchmarks/driver_scale.py)."""
    computed = objective_table.computed(spec.student)
    acc = 1.0 - 1.0 / (1.0 + math.log1p(float(computed["flops"])))
    for epoch in range(1, spec.train.epochs + 1):
        report({"epoch": epoch, "val_acc": acc * epoch / spec.train.epochs, "train_loss": 1.0 / epoch, **computed})


def _hung(max_minutes: float, grace: float) -> str:
    return (
        f"TrialTimedOut: still running {max_minutes + grace:g} min after its start, past "
        f"train.max_minutes={max_minutes:g} plus {grace:g} min of grace, with no batch boundary "
        "reached (stuck in a call); its worker was ended"
    )


def _end_hung_worker(attempts: Attempts, trial_id: str, reason: str) -> None:
    """The watchdog's last resort for a trial stuck where no batch boundary comes (a C call, a
    dead collective): record the reason as this attempt's failure and end this worker process.
    Tune sees a lost worker and starts the trial again; that attempt counts this one against
    max_failures (kdsearch.search.attempts) and, past it, ends the trial with the reason."""
    with contextlib.suppress(Exception):
        attempts.fail(reason)
    print(f"kdsearch: trial {trial_id}: {reason}", file=sys.stderr, flush=True)
    os._exit(70)


def _restored_checkpoint(local: Path) -> Path | None:
    """The trial's latest checkpoint (a retry or a resumed run's unfinished trial), copied to
    `local` from the run's storage; None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    return Path(checkpoint.to_directory(str(local)))


def require_data_here(dspec: Any, node_id: str) -> None:
    """A dataset read from disk must be at the same path on every node that trains: say which
    node lacks it (the trial fails with this line as its error)."""
    if dspec.root and not Path(dspec.root).is_dir():
        raise KdsearchError(f"data.root: {dspec.root} does not exist on node {socket.gethostname()} ({node_id[:12]})")


# Ray's logger for token authentication: at every ray.init that starts a local Ray it warns that
# token authentication is on (kdsearch leaves it on); only that message is dropped
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_AUTH_ON)


def _accepts_unauthenticated(address: str) -> bool:
    """Whether the joined cluster lets in a caller without a token. A driver that has one is let
    in either way, so the GCS is asked once without it (GetClusterId checks the token); through
    Ray Client (ray://) only the driver's own mode tells: joined without a token, none is asked."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if address.startswith("ray://"):
        return not is_token_auth_enabled()
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(ray.get_runtime_context().gcs_address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=10
            )
        except grpc.RpcError:  # UNAUTHENTICATED; or a TLS cluster, which this plain channel cannot tell
            return False
    return True


def _init_ray(address: str | None, say: Callable[[str], None] | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS: `cluster_address`), or start the embedded
    one with every listener on loopback.

    ray.init turns `_node_ip_address="127.0.0.1"` into the machine's network address
    (ray/_private/worker.py: services.resolve_ip_for_localhost), and Ray's GCS, raylet, workers
    and agents listen on all interfaces unless the node's address is loopback. Only
    ray_constants.ENABLE_RAY_CLUSTER off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at
    `import ray`) makes services.get_node_ip_address answer loopback: it is turned off around this
    ray.init only, after which Ray takes the node's address from the node it started. Token
    authentication stays on (a token in ~/.ray/auth_token, made once); on a cluster that accepts
    unauthenticated connections kdsearch says so in one line.
    """
    if ray.is_initialized():
        return
    address = cluster_address(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; LiveView shows progress
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KdsearchError(
                f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0][:200]}"
            ) from None
        if _accepts_unauthenticated(address):
            (say or _to_stderr)(
                f"--address {address}: this Ray cluster accepts unauthenticated connections "
                "(RAY_AUTH_MODE=disabled): anyone who reaches its ports can run code on it"
            )
        return
    from ray._private import ray_constants

    notice = _DropTokenAuthNotice()
    logging.getLogger(_TOKEN_AUTH_LOGGER).addFilter(notice)
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init("local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        logging.getLogger(_TOKEN_AUTH_LOGGER).removeFilter(notice)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must answer a TCP connection within `timeout`:
    ray.init would otherwise wait minutes for an address where nothing listens."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them, and fails fast when there is nothing
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise KdsearchError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a command joins: `address` (--address), else RAY_ADDRESS (as `ray job
    submit` sets it for its entrypoint), else None: kdsearch starts its embedded Ray.

    NOTE: ray.init() without an address also joins the cluster that `ray start` last recorded in
    /tmp/ray/ray_current_cluster (services.get_ray_address_from_environment), so a search
    joined whatever cluster ran on the machine (a test's, a colleague's); the embedded Ray is
    started with address="local", which never looks there.
    """
    return address or os.environ.get("RAY_ADDRESS") or None


def reuse_on(address: str | None) -> bool:
    """Whether a search's trials reuse their workers: on the embedded Ray, yes; on a cluster, no.

    NOTE: Ray Tune 2.60 hands a cached worker to the next trial with a `reset` call made while
    that trial is PENDING. When the worker's node is gone, one actor death reaches Tune twice
    (the actor's error callback, then the reset's; ray/air/execution/_internal/actor_manager.py
    `_actor_task_failed`): the first counts failure 1 and requeues the trial as PENDING, the
    second counts failure 2 on a PENDING trial, which Tune ends as ERROR without a retry
    (tune_controller.py `_actor_failed`, `_process_trial_failure`). A fresh worker per trial is
    started while its trial is PENDING and runs every task while it is RUNNING, so a lost node
    costs one failure and a retry elsewhere. Only a cluster loses nodes; on it a fresh worker
    costs seconds against trials of minutes (benchmarks/search_overhead.py measures both).
    """
    return not address


def trial_slots(asks: Any, cluster: dict[str, float]) -> int:
    """How many trials asking `asks` (cpus, gpus) fit in `cluster` (ray.cluster_resources()) at
    once, counted by totals (a node's leftovers may not fit a trial); at least 1."""
    slots = [cluster.get("CPU", 0.0) / asks.cpus] if asks.cpus > 0 else []
    slots += [cluster.get("GPU", 0.0) / asks.gpus] if asks.gpus > 0 else []
    return max(1, int(min(slots, default=1)))


def _check_local_gpus(gpus: float) -> None:
    """On the embedded local Ray, a trial cannot have more GPUs than this machine: say so
    before anything trains. Only there: a cluster's GPUs are the ones its nodes declare (`ray
    start --num-gpus`; the autoscaler may add nodes), whatever this machine has."""
    if gpus <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    if gpus > have:
        raise KdsearchError(
            f"resources.gpus: each trial asks for {gpus:g} GPUs but this machine has {have}; "
            "lower it, or join a cluster with --address"
        )


def _prepare_run(
    space_file: Path,
    space: SearchSpace,
    paths: RunPaths,
    resume: bool,
    trials: int | None,
    address: str | None,
    from_run: str | None = None,
) -> dict[str, Any]:
    """Create (or check, on resume) the run in its storage; returns its run.json."""
    text = Path(space_file).read_text()
    store = paths.store
    if resume:
        if not store.exists(RunPaths.META):
            raise KdsearchError(f"--resume: {paths.uri} holds no run to resume; start it without --resume")
        if from_run:
            raise KdsearchError("--from: only a new run starts from another; --resume continues this one")
        meta = paths.meta()
        for table in (RunPaths.TRIALS, RunPaths.EPOCHS):  # a torn table: one line now, before Ray starts
            paths.rows(table)
        if store.exists(RunPaths.SPACE) and store.read_text(RunPaths.SPACE) != text:
            raise KdsearchError(
                f"--resume: {space_file} differs from the space the run started with ({store.uri_of(RunPaths.SPACE)})"
            )
        if trials is not None and trials < int(meta["trials"]):
            raise KdsearchError(
                f"--trials {trials}: the run was started for {meta['trials']} trials; --resume can only extend it"
            )
        return meta
    if store.exists(RunPaths.META):
        raise KdsearchError(
            f"--name: a run already exists at {paths.uri}; use --resume to continue it or another --name"
        )
    store.write_text(RunPaths.SPACE, text)
    meta = {
        "name": paths.name,
        "space_file": str(Path(space_file).resolve()),
        "space_name": space.name,
        "trials": trials or space.search.trials,
        "started": time.time(),
        "address": address,
        "kdsearch": __version__,
        "objectives": [list(o) for o in space.objectives],
        "hypervolume_reference": space.reference_point(),
        "tune": RunPaths.TUNE,  # the Ray Tune experiment now running (an extended run gets another)
        "from": from_run,  # the earlier run whose trials the sampler started from (--from)
    }
    write_json(store, RunPaths.META, meta)
    return meta


def _load_once(space: SearchSpace, cache: Storage, say: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """Load the data, and the teacher's logits (computed once by Ray tasks, or read from the
    cache under the storage root: per image, or per image and epoch with the view's seed when
    the augmentation is random) and its weights for the trials that run it live.

    All three go to the workers through Ray's object store: no worker loads the teacher's
    checkpoint or runs it for the cache. The logits are None where no trial reads them.
    """
    from kdsearch.search.teacher_tasks import cached_teacher_logits, cached_teacher_views
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import cache_key
    from kdsearch.train.teacher import ShippedTeacher, load_teacher

    data = load_data(space)
    sources = space.teacher_sources()
    if sources == {TeacherSource.NONE}:
        return data, None, None
    teacher = load_teacher(space, train_if_missing=True, log=say, data=data)  # trains the built-in one if missing
    shipped = (
        ShippedTeacher.of(teacher, space, cache_key(space.teacher, data)) if TeacherSource.LIVE in sources else None
    )
    if TeacherSource.CACHED not in sources:
        return data, None, shipped
    build = cached_teacher_views if data.random_augment else cached_teacher_logits
    return data, build(space, data, teacher, cache, space.resources.gpus, say), shipped


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
) -> SearchResult:
    """Run (or resume, or extend) a search; returns the trials table and the front.

    `storage` is where runs live: a local or NFS path, or a URI (s3://, gs://, any pyarrow
    filesystem); the run is `storage/name`, the teacher-logit cache `storage/cache`.
    `resume` continues a run whose driver died; with `trials` above the run's total it then
    extends the run to that many trials (a finished run too), rerunning none.
    `from_run` (a new run only) starts the sampler from an earlier run's trials of the same
    data, as if this search had run them (kdsearch.search.warm_start).
    `console` (a rich Console) gets a live view of the search; `say` its one-line messages.
    `reuse_actors` (default: `reuse_on`, by where the search runs) keeps a trial's worker for
    the next trial; `False` is Ray's default, kept as a baseline for benchmarks: every trial
    then pays a fresh worker's imports and data loading.
    `trial` (benchmarks only) replaces training in the workers: `noop_trial` reports epochs
    at once, so a benchmark measures the driver's own cost per trial; no data or teacher loads.
    """
    from kdsearch.train.faults import hang_grace_minutes

    space_file = Path(space_file)
    space = load_space(space_file)
    hang_grace_minutes()  # a bad KDSEARCH_HANG_GRACE_MINUTES: one line here, not in every trial
    root = Storage.open(storage or "runs")
    root.check_writable()  # a bucket that does not exist or refuses writes: one line, before anything runs
    address = cluster_address(address)
    if address:
        _check_reachable(address)
    else:
        _check_local_gpus(space.resources.gpus)
    earlier = _earlier_trials(from_run) if from_run is not None else None
    paths = RunPaths(root.child(name or space.name))
    meta = _prepare_run(space_file, space, paths, resume, trials, address, None if from_run is None else str(from_run))
    total = trials or int(meta["trials"])

    owns_ray = not ray.is_initialized()
    _init_ray(address, say)
    try:
        reuse = reuse_on(address) if reuse_actors is None else reuse_actors
        search = _Search(space, paths, root.child("cache"), meta, console, say, reuse, trial)
        if not resume:
            return search.start(total, earlier)
        return search.resume(total)
    finally:
        if owns_ray:
            ray.shutdown()


# Ray Tune's loggers whose warnings speak of Tune's API, not of kdsearch's: after Ctrl-C they
# advise `Tuner.restore(...)` (kdsearch says its own --resume command), and at the end they warn
# that an infeasible trial (which never wrote Tune's result files) has no metrics to fetch
_TUNE_ADVICE = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# Ray Tune's controller, when a callback's on_trial_complete raises in its stop_trial, logs the
# error and fails the trial; when it is the recorder's StorageError the search stops on it (the
# trial's error hook meets the storage again) and says it in kdsearch's own line: dropped here
_TUNE_CONTROLLER = "ray.tune.execution.tune_controller"


# Ray's loggers that, when the storage fails, log the error with its traceback and go on: Tune's
# experiment-state saving (ray/tune/execution/experiment_state.py, tune.py's final snapshot), Ray
# Train's directory creation and its syncer (the traceback written into the message), and Tune's
# controller (a trial that failed on the storage, with the worker's traceback). The search stops at
# the recorder's next write with kdsearch's own line, so theirs are cut to one line each
_TUNE_SYNC_LOGGERS = (
    "ray.tune.execution.experiment_state",
    "ray.tune.tune",
    "ray.train._internal.storage",
    "ray.train._internal.syncer",
    _TUNE_CONTROLLER,
)
_TRACEBACK = "Traceback (most recent call last):"


class _NoTraceback(logging.Filter):
    """A record cut to one line: its message's first line, then the error it ends with."""

    def filter(self, record: logging.LogRecord) -> bool:
        message, exc = record.getMessage(), record.exc_info[1] if record.exc_info else None
        # a Ray task's error holds the worker's traceback: the error is its last line
        error = "" if exc is None else _last_line(str(exc)) if isinstance(exc, RayTaskError) else first_line(exc)
        if _TRACEBACK in message:
            message, _, trace = message.partition(_TRACEBACK)
            error = error or _last_line(trace)
        elif not error:
            return True
        head = message.strip().splitlines()[0].rstrip(": ") if message.strip() else ""
        record.msg = f"{head}: {error}" if error else head
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


def _last_line(text: str) -> str:
    """The error a traceback (or a Ray task error's text) ends with: its last non-empty line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


class _DropStorageErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StorageError))


@contextlib.contextmanager
def _one_line_sync_errors() -> Iterator[None]:
    filters: list[tuple[logging.Logger, logging.Filter]] = [(logging.getLogger(_TUNE_CONTROLLER), _DropStorageErrors())]
    filters += [(logging.getLogger(n), _NoTraceback()) for n in _TUNE_SYNC_LOGGERS]
    for lg, flt in filters:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg, flt in filters:
            lg.removeFilter(flt)


def _torn_tune_state(store: Storage, experiment: str) -> str | None:
    """The first of a Tune experiment's saved state files (its experiment_state JSON, the
    searcher's and the tuner's pickles, at the experiment's top level) that is torn, or None.
    JSON is parsed, a pickle only walked opcode by opcode (pickletools: nothing is unpickled)."""
    import json
    import pickletools

    for name in store.files(experiment):
        if not name.endswith((".json", ".pkl")) or name.startswith("."):
            continue
        rel = f"{experiment}/{name}"
        data = store.read_bytes(rel)
        try:
            if name.endswith(".json"):
                json.loads(data)
            else:
                for _ in pickletools.genops(data):
                    pass
        except ValueError:  # JSONDecodeError; a pickle without its STOP opcode
            return rel
    return None


def _earlier_trials(location: str | os.PathLike) -> list[dict[str, Any]]:
    """The trials of the run `--from` names; one clear line when it is not a run or has none."""
    from kdsearch.results.tables import open_run

    rows = open_run(location).rows(RunPaths.TRIALS)
    if not rows:
        raise KdsearchError(f"--from {location}: the run has no recorded trials yet")
    return rows


class _Search:
    """One run's Ray Tune experiments: the first, a resumed one, and extensions (each a Tune
    experiment of its own in the run's storage, named in run.json's "tune")."""

    def __init__(
        self,
        space: SearchSpace,
        paths: RunPaths,
        cache: Storage,
        meta: dict[str, Any],
        console: Any,
        say: Callable[[str], None],
        reuse_actors: bool,
        trial: Callable[..., None] | None = None,
    ):
        self.space, self.paths, self.meta, self.console, self.say = space, paths, meta, console, say
        self.reuse_actors, self.trial = reuse_actors, trial
        self._view: LiveView | None = None  # the running experiment's live view, if any
        self._recorder: ResultsRecorder | None = None  # the new experiment's (a restored one brings its own)
        self.data, self.cached, self.teacher = _load_once(space, cache, say) if trial is None else (None, None, None)

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
        if earlier is not None:
            warm = add_earlier_trials(
                searcher.study, self.space, earlier, self.space.objectives, searcher.study.sampler
            )
            self.say(warm.describe(str(self.meta["from"])))
        return self._fit(self._tuner(searcher, total, RunPaths.TUNE), total)

    def resume(self, total: int) -> SearchResult:
        """Continue the run's current experiment where the driver left it; then, when `total`
        is above what the run has, extend it with a new experiment warm-started from every
        recorded trial."""
        store, experiment = self.paths.store, self.meta.get("tune", RunPaths.TUNE)
        recorded = self.paths.rows(RunPaths.TRIALS)
        result = None
        if len(recorded) < int(self.meta["trials"]):  # the experiment has trials left to run
            tune_dir = store.path(experiment)
            if not tune.Tuner.can_restore(tune_dir, storage_filesystem=store.fs):
                raise KdsearchError(
                    f"--resume: {store.uri_of(experiment)} holds no Ray Tune state (the search died before its first checkpoint); start it again"
                )
            torn = _torn_tune_state(store, experiment)
            if torn is not None:
                # the storage failed while Tune copied its state (its copies are not written then renamed):
                # what remains is the recorded trials, and a new experiment continues from them
                self.say(
                    f"--resume: Ray Tune's saved state {store.uri_of(torn)} is torn (the storage failed while it "
                    f"was written); continuing with a new experiment started from the {len(recorded)} recorded trials"
                )
                return self._extend(max(total, int(self.meta["trials"])), recorded)
            tuner = tune.Tuner.restore(
                tune_dir,
                trainable=self._trainable(),
                resume_unfinished=True,
                resume_errored=False,
                storage_filesystem=store.fs,
            )
            self.say(f"resuming {self.paths.uri}")
            result = self._fit(tuner, int(self.meta["trials"]))
            if result.interrupted:
                return result
            recorded = result.trials
        if total <= len(recorded):
            if result is None:
                self.say(f"{self.paths.uri} already has {len(recorded)} trials; --trials N above that extends it")
            return result or self._result(total, None)
        return self._extend(total, recorded)

    def _extend(self, total: int, recorded: list[dict[str, Any]]) -> SearchResult:
        current = str(self.meta.get("tune", RunPaths.TUNE))
        n = int(current.rpartition("-")[2]) if current != RunPaths.TUNE else 1  # experiments so far
        experiment = f"{RunPaths.TUNE}-{n + 1}"
        # a sampler seeded afresh for each extension: the first one's draws would repeat the run's start
        searcher = self._searcher(total, (self.space.search.seed + n) % 2**32)
        warm = add_earlier_trials(searcher.study, self.space, recorded, self.space.objectives, searcher.study.sampler)
        self.meta.update(trials=total, tune=experiment)
        write_json(self.paths.store, RunPaths.META, self.meta)
        self.say(f"extending {self.paths.uri} from {len(recorded)} to {total} trials; {warm.describe('this run')}")
        return self._fit(self._tuner(searcher, total - len(recorded), experiment), total)

    def _searcher(self, total: int, seed: int) -> KdsearchOptunaSearch:
        space = self.space
        settings = dataclasses.replace(space.search, seed=seed)
        return KdsearchOptunaSearch(
            space=DefineByRun(space),
            metric=[name for name, _ in space.objectives],
            mode=[mode for _, mode in space.objectives],
            sampler=make_sampler(settings),
            run=self.paths,
            total=total,
        )

    def _trainable(self) -> Any:
        space = self.space
        measured = tuple(
            objective_table.get(name) for name, _ in space.objectives if objective_table.get(name).source == "measured"
        )
        return tune.with_resources(
            tune.with_parameters(
                _trainable,
                run=self.paths,
                data=self.data,
                cached_logits=self.cached,
                teacher=self.teacher,
                threads=max(1, int(space.resources.cpus)),
                objectives=space.objectives,
                measured=measured,
                world_size=int(space.resources.gpus) if space.resources.gpus >= 2 else 1,
                checkpoint_every=space.search.checkpoint_every,
                max_failures=space.search.max_failures,
                trial=self.trial,
            ),
            {"cpu": space.resources.cpus, "gpu": space.resources.gpus},
        )

    def _tuner(self, searcher: KdsearchOptunaSearch, num_samples: int, experiment: str) -> tune.Tuner:
        space, store = self.space, self.paths.store
        acc, _ = accuracy_and_cost(space.objectives)
        costs = tuple(name for name, mode in space.objectives if mode == "min")
        recorder = self._recorder = ResultsRecorder(self.paths, searcher)
        callbacks: list[tune.Callback] = [recorder]
        self._view = None
        if self.console is not None:
            self._view = LiveView(recorder, space, searcher.total, float(self.meta["started"]), self.console)
            callbacks.append(self._view)
        return tune.Tuner(
            self._trainable(),
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

    def _fit(self, tuner: tune.Tuner, total: int) -> SearchResult:
        # Tune warns whenever checkpoints force several experiment snapshots within 5 s: with short
        # epochs they do, by design (above), and a search printed the warning ~200 times
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        try:
            with _quiet(*_TUNE_ADVICE), _one_line_sync_errors(), self._pending_trials():
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
        return self._result(total, grid)

    @contextlib.contextmanager
    def _pending_trials(self) -> Iterator[None]:
        """On a cluster, as many trials pending as the cluster has room for now, while Tune runs.

        NOTE: with a searcher and no `search.max_concurrent`, Ray Tune 2.60 keeps one trial pending
        (tune_controller.py `_get_max_pending_trials`), so trials start one after another; a fresh
        worker per trial (`reuse_on`) then took ~10-20 s each to fill a cluster. Tune reads
        TUNE_MAX_PENDING_TRIALS_PG when fit() builds its controller; one the user set is kept.
        """
        if self.reuse_actors or self.space.search.max_concurrent or "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
            yield
            return
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(trial_slots(self.space.resources, ray.cluster_resources()))
        try:
            yield
        finally:
            del os.environ["TUNE_MAX_PENDING_TRIALS_PG"]

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
