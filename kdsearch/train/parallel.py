"""Data-parallel trials: one trial trained in several processes with DistributedDataParallel.

A trial that asks for N >= 2 GPUs (`resources.gpus`, `TrialSetup.world_size`) trains in N
processes, one GPU each (NCCL); on CPUs the same path runs with the gloo backend (how the tests
check it). This process is rank 0: it prepares the data and the teacher's signal once (the
cache is filled here, never N times), starts ranks 1..N-1 as fresh processes, each handed the
trial's setup with that signal in it, trains its own share, and alone evaluates, reports,
checkpoints and saves; a trial continued from a checkpoint loads it in every process (each
holds the same optimizer state, as gradients are averaged). The global batch is
`train.batch_size` images, each process taking every N-th image of it, so the trial follows
the same curve as on one device.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from kdsearch.errors import KdsearchError
from kdsearch.space.specs import TeacherSource, TrialSpec
from kdsearch.train.setup import Report, TrialSetup, quiet
from kdsearch.train.training import teacher_signal, train_trial

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that died leaves the others waiting at most this long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _join(rank: int, world: int, port: int) -> torch.device:
    import torch.distributed as dist

    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the processes of one trial talk over loopback
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return device


def _rank_main(rank: int, port: int, threads: int, spec: TrialSpec, setup: TrialSetup) -> None:
    """A process of ranks 1..N-1: train its share, report nothing, save nothing."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = _join(rank, setup.world_size, port)
    try:
        signal = teacher_signal(spec, setup, device)  # the setup carries rank 0's cache or teacher: nothing loads
        train_trial(spec, setup, lambda m, **_: None, signal=signal, device=device, shard=(rank, setup.world_size))
    finally:
        dist.destroy_process_group()


def check_fits(spec: TrialSpec, world: int) -> None:
    """Raise KdsearchError when `spec` cannot train in `world` processes here: its global batch
    does not split evenly, or CUDA shows fewer GPUs than processes."""
    if spec.train.batch_size % world:
        raise KdsearchError(f"train.batch_size {spec.train.batch_size} must divide evenly over {world} processes")
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise KdsearchError(f"a data-parallel trial over {world} GPUs sees {torch.cuda.device_count()}")


def start_ranks(spec: TrialSpec, setup: TrialSetup, port: int, threads: int) -> list[BaseProcess]:
    """Start ranks 1..N-1 as fresh interpreters (spawn: no forked CUDA or Ray state), each
    handed `spec` and `setup`."""
    context = multiprocessing.get_context("spawn")
    others = [
        context.Process(target=_rank_main, args=(r, port, threads, spec, setup), daemon=True)
        for r in range(1, setup.world_size)
    ]
    for p in others:
        p.start()
    return others


def end_ranks(others: list[BaseProcess]) -> None:
    """Wait for the other ranks, a minute each at most, then kill them."""
    for p in others:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()


def check_ranks(others: list[BaseProcess]) -> None:
    """Raise RuntimeError when any of the other ranks failed."""
    failed = [p.exitcode for p in others if p.exitcode != 0]
    if failed:
        raise RuntimeError(
            f"data-parallel trial: {len(failed)} of its {len(others)} other processes failed (exit codes {failed})"
        )


def run_data_parallel(spec: TrialSpec, setup: TrialSetup, report: Report) -> dict[str, Any]:
    """`run_trial` in `setup.world_size` processes (see the module doc); `setup.data` must be loaded.

    Returns:
        Rank 0's last metrics, as `run_trial` returns them.
    """
    import torch.distributed as dist

    world = setup.world_size
    check_fits(spec, world)
    signal = teacher_signal(spec, setup, torch.device("cpu"))
    # the other ranks train with this signal and measure, log and save nothing
    shared = dataclasses.replace(
        setup, teacher=signal.teacher, cached_logits=signal.cache, objectives=(), log=quiet, device=None
    )
    port, threads = _free_port(), max(1, torch.get_num_threads() // world)
    others = start_ranks(spec, shared, port, threads)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = _join(0, world, port)
    try:
        if signal.teacher is not None and signal.source is TeacherSource.LIVE:
            signal.teacher = signal.teacher.to(device)
        result = train_trial(spec, setup, report, signal=signal, device=device, shard=(0, world))
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        end_ranks(others)
    check_ranks(others)
    return result
