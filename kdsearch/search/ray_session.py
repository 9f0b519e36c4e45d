"""Ray's session for a search or a confirmation: which cluster, joining it or starting the
embedded one on loopback, what the joined cluster lets in, the local GPUs, how many trials a
cluster fits, and the filters that keep Ray's and Tune's loggers to kdsearch's one-line style.

Each workaround of a Ray behaviour names, in its comment, the test that pins it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray
from ray.exceptions import RayTaskError

from kdsearch.errors import KdsearchError
from kdsearch.storage import StorageError, first_line

# Ray's logger for token authentication: at every ray.init that starts a local Ray it warns that
# token authentication is on (kdsearch leaves it on); only that message is dropped
# (tests/test_ray_sockets.py test_embedded_search_listens_on_loopback_only)
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster"


# Ray's and Ray Tune's environment switches while a search or a confirmation runs (`switched`)
RAY_SWITCHES = {
    "RAY_DEDUP_LOGS": "0",  # a Ray started here (its processes inherit the driver's environment) dedups no log
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: Tune prints nothing; LiveView shows progress
    # Tune warns whenever checkpoints force several experiment snapshots within 5 s: with short epochs
    # they do, by design (two checkpoints kept per trial, search/run.py), so the warning is off
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@contextlib.contextmanager
def switched(values: Mapping[str, str] = RAY_SWITCHES) -> Iterator[None]:
    """`values` in os.environ while the block runs, each one the caller has not set; afterwards the
    caller's environment as it was: a variable the caller set keeps the caller's value throughout
    (tests/test_search.py test_existing_run_needs_resume)."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def ray_session(address: str | None, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Ray for one search or confirmation: `RAY_SWITCHES` set (`switched`) and Ray joined or
    started (`init_ray`) unless it already runs; on the way out, a Ray started here is shut down
    and the environment is the caller's again.

    Args:
        address: the cluster to join; None for RAY_ADDRESS, else the embedded Ray.
        say: where the one-line notice of `init_ray` goes (stderr when None).
    """
    with switched():
        owns_ray = not ray.is_initialized()
        init_ray(address, say)
        try:
            yield
        finally:
            if owns_ray:
                ray.shutdown()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_AUTH_ON)


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a command joins: `address` (--address), else RAY_ADDRESS (as `ray job
    submit` sets it for its entrypoint), else None: kdsearch starts its embedded Ray.

    NOTE: ray.init() without an address also joins the cluster that `ray start` last recorded in
    /tmp/ray/ray_current_cluster (services.get_ray_address_from_environment), so the embedded
    Ray is started with address="local", which never looks there
    (tests/test_ray_sockets.py test_the_embedded_ray_never_joins_a_cluster_it_finds_on_the_machine).
    """
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must answer a TCP connection within `timeout`:
    ray.init would otherwise wait minutes for an address where nothing listens
    (tests/test_search.py test_unreachable_address_is_one_line).

    Raises:
        KdsearchError: nothing answers there.
    """
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them, and fails fast when there is nothing
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise KdsearchError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def accepts_unauthenticated(address: str) -> bool:
    """Whether the joined cluster lets in a caller without a token. A driver that has one is let
    in either way, so the GCS is asked once without it (GetClusterId checks the token); through
    Ray Client (ray://) only the driver's own mode tells: joined without a token, none is asked.

    Args:
        address: the address the driver joined (Ray is initialized).
    """
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


def init_ray(address: str | None, say: Callable[[str], None] | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS: `cluster_address`), or start the embedded
    one with every listener on loopback. Nothing when Ray is already initialized. `RAY_SWITCHES`
    are set while Ray starts (the processes of a Ray started here inherit them), not after.

    ray.init turns `_node_ip_address="127.0.0.1"` into the machine's network address
    (ray/_private/worker.py: services.resolve_ip_for_localhost), and Ray's GCS, raylet, workers
    and agents listen on all interfaces unless the node's address is loopback. Only
    ray_constants.ENABLE_RAY_CLUSTER off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at
    `import ray`) makes services.get_node_ip_address answer loopback: it is turned off around this
    ray.init only, after which Ray takes the node's address from the node it started
    (tests/test_ray_sockets.py test_embedded_search_listens_on_loopback_only). Token
    authentication stays on (a token in ~/.ray/auth_token, made once); on a cluster that accepts
    unauthenticated connections kdsearch says so in one line.

    Args:
        address: the cluster to join; None for RAY_ADDRESS, else the embedded Ray.
        say: where the one-line notice goes (stderr when None).

    Raises:
        KdsearchError: the cluster cannot be joined.
    """
    if ray.is_initialized():
        return
    address = cluster_address(address)
    with switched():
        if address:
            _join(address, say or _to_stderr)
        else:
            _start_embedded()


def _start_embedded() -> None:
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


def _join(address: str, say: Callable[[str], None]) -> None:
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise KdsearchError(
            f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0][:200]}"
        ) from None
    if accepts_unauthenticated(address):
        say(
            f"--address {address}: this Ray cluster accepts unauthenticated connections "
            "(RAY_AUTH_MODE=disabled): anyone who reaches its ports can run code on it"
        )


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
    costs seconds against trials of minutes (benchmarks/search_overhead.py measures both;
    tests/test_gpu_scheduling.py counts a fresh worker per trial on a cluster).
    """
    return not address


def trial_slots(asks: Any, cluster: dict[str, float]) -> int:
    """How many trials asking `asks` (cpus, gpus) fit in `cluster` (ray.cluster_resources()) at
    once, counted by totals (a node's leftovers may not fit a trial); at least 1."""
    slots = [cluster.get("CPU", 0.0) / asks.cpus] if asks.cpus > 0 else []
    slots += [cluster.get("GPU", 0.0) / asks.gpus] if asks.gpus > 0 else []
    return max(1, int(min(slots, default=1)))


def check_local_gpus(gpus: float) -> None:
    """On the embedded local Ray, a trial cannot have more GPUs than this machine: say so
    before anything trains. Only there: a cluster's GPUs are the ones its nodes declare (`ray
    start --num-gpus`; the autoscaler may add nodes), whatever this machine has.

    Raises:
        KdsearchError: each trial asks for more GPUs than torch sees here.
    """
    if gpus <= 0:
        return
    import torch

    have = torch.cuda.device_count()
    if gpus > have:
        raise KdsearchError(
            f"resources.gpus: each trial asks for {gpus:g} GPUs but this machine has {have}; "
            "lower it, or join a cluster with --address"
        )


# Ray Tune's loggers whose warnings speak of Tune's API, not of kdsearch's: after Ctrl-C they
# advise `Tuner.restore(...)` (kdsearch says its own --resume command), and at the end they warn
# that an infeasible trial (which never wrote Tune's result files) has no metrics to fetch
# (tests/test_interrupt.py test_ctrl_c_says_what_finished_and_how_to_resume)
TUNE_ADVICE = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The loggers `names` at ERROR while the block runs, then at their own levels again."""
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
# (tests/test_faults.py test_a_full_disk_or_a_read_only_one_stops_the_search_whole_and_resume_continues,
# tests/test_storage_s3.py test_an_unreachable_storage_stops_the_search_whole_and_resume_continues)
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
def one_line_sync_errors() -> Iterator[None]:
    """While the block runs, Ray's storage-failure logs are one line each, and Tune's controller
    drops the recorder's StorageError (the search stops on it with kdsearch's own line)."""
    filters: list[tuple[logging.Logger, logging.Filter]] = [(logging.getLogger(_TUNE_CONTROLLER), _DropStorageErrors())]
    filters += [(logging.getLogger(n), _NoTraceback()) for n in _TUNE_SYNC_LOGGERS]
    for lg, flt in filters:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg, flt in filters:
            lg.removeFilter(flt)
