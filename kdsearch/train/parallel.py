"""Data-parallel trials: one trial trained in several processes with DistributedDataParallel.

A trial that asks for N >= 2 GPUs (`resources.gpus`) trains in N processes, one GPU each
(NCCL); on CPUs the same path runs with the gloo backend (how the tests check it). This
process is rank 0: it prepares the data and the teacher's signal once (the cache is filled
here, never N times), starts ranks 1..N-1 as fresh processes, trains its own share, and alone
evaluates, reports, checkpoints and saves; a trial continued from a checkpoint loads it in
every process (each holds the same optimizer state, as gradients are averaged). The global batch is `train.batch_size` images, each process
taking every N-th image of it, so the trial follows the same curve as on one device.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from kdsearch.errors import KdsearchError

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


def _rank_main(rank: int, world: int, port: int, threads: int, job: dict[str, Any]) -> None:
    """A process of ranks 1..N-1: train its share, report nothing, save nothing."""
    import torch.distributed as dist

    from kdsearch.train.loop import TeacherSignal
    from kdsearch.train.trial import train_trial

    torch.set_num_threads(threads)
    device = _join(rank, world, port)
    try:
        signal = TeacherSignal(**job["signal"])
        if signal.teacher is not None and signal.source.value == "live":
            signal.teacher = signal.teacher.to(device)
        train_trial(
            job["spec"], lambda m, **_: None, None, job["data"], signal, device, job["loader_workers"], (),
            (rank, world), 0, job["resume"],
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def run_data_parallel(
    world: int,
    spec: Any,
    report: Any,
    workdir: Path,
    *,
    data: Any,
    teacher: Any,
    cached_logits: Any,
    cache_dir: Any,
    live_teacher: bool,
    loader_workers: int,
    objectives: Any,
    log: Any,
    checkpoint_every: int = 0,
    resume_from: Any = None,
) -> dict[str, Any]:
    """`run_trial` in `world` processes; returns rank 0's last metrics (see the module doc)."""
    import torch.distributed as dist

    from kdsearch.space.specs import teacher_source
    from kdsearch.train.trial import teacher_signal, train_trial

    if spec.train.batch_size % world:
        raise KdsearchError(f"train.batch_size {spec.train.batch_size} must divide evenly over {world} processes")
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise KdsearchError(f"a data-parallel trial over {world} GPUs sees {torch.cuda.device_count()}")
    source = teacher_source(spec.recipe, live=live_teacher)
    signal = teacher_signal(
        spec, source, data, torch.device("cpu"), teacher, cached_logits, Path(cache_dir or workdir / "cache"), log
    )
    shared = {k: getattr(signal, k) for k in ("source", "teacher", "cached", "replay", "features", "attn")}
    resume = Path(resume_from) if resume_from is not None else None
    job = {"spec": spec, "data": data, "signal": shared, "loader_workers": loader_workers, "resume": resume}
    port, threads = _free_port(), max(1, torch.get_num_threads() // world)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA or Ray state
    others = [
        context.Process(target=_rank_main, args=(r, world, port, threads, job), daemon=True) for r in range(1, world)
    ]
    for p in others:
        p.start()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = _join(0, world, port)
    try:
        if signal.teacher is not None and source.value == "live":
            signal.teacher = signal.teacher.to(device)
        result = train_trial(
            spec,
            report,
            workdir,
            data,
            signal,
            device,
            loader_workers,
            objectives,
            (0, world),
            checkpoint_every,
            resume,
        )
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
        for p in others:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    failed = [p.exitcode for p in others if p.exitcode != 0]
    if failed:
        raise RuntimeError(
            f"data-parallel trial: {len(failed)} of its {world - 1} other processes failed (exit codes {failed})"
        )
    return result
