"""The training of one trial in one process: the teacher's signal, the student, every epoch
(train, evaluate, measure, report, checkpoint), then the student saved.

`run_trial` (kdsearch.train.trial) calls it in one process; `run_data_parallel`
(kdsearch.train.parallel) in each of its processes. Neither of them imports the other: both
stand on this module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.models.student import build_student
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import MeasureContext
from kdsearch.space.specs import TeacherSource, TrialSpec, teacher_source
from kdsearch.storage import Storage
from kdsearch.train.checkpoint import load_training_state, restore_rng, save_student, save_training_state
from kdsearch.train.data import Data
from kdsearch.train.distill import DistillLoss
from kdsearch.train.evaluation import evaluate
from kdsearch.train.faults import OUT_OF_MEMORY, TimeLimit, TrialOutOfMemory
from kdsearch.train.logit_cache import TeacherLogits, cache_key, teacher_logits
from kdsearch.train.loop import DistillStep, TeacherSignal, efficiency, make_optimizer, train_epoch
from kdsearch.train.measure import measure_objective
from kdsearch.train.replay_cache import ReplayCache, build_replay_cache
from kdsearch.train.setup import Report, TrialSetup
from kdsearch.train.teacher import load_teacher


def teacher_signal(spec: TrialSpec, setup: TrialSetup, device: torch.device) -> TeacherSignal:
    """The teacher's signal for `spec`, from where `teacher_source` says it comes.

    Loads the teacher only when it must run (live, or to fill a cache the setup does not
    carry) and reads or fills the cache once (`teacher_cache`). `setup.data` must be loaded.
    """
    source = teacher_source(spec.recipe, live=setup.live_teacher)
    if source is TeacherSource.NONE:
        return TeacherSignal(source)
    data, teacher, cache, images = setup.data, setup.teacher, setup.cached_logits, 0
    if teacher is None and (source is TeacherSource.LIVE or cache is None):
        teacher = load_teacher(spec, log=setup.log, data=data)
    if source is TeacherSource.LIVE:
        r = spec.recipe
        return TeacherSignal(source, teacher=teacher.to(device), features=r.needs_features, attn=r.needs_attention)
    if cache is None:
        cache, images = teacher_cache(spec, data, teacher, setup.teacher_cache_dir)
    if isinstance(cache, ReplayCache):
        return TeacherSignal(source, teacher=teacher, replay=cache, images=images)
    return TeacherSignal(source, teacher=teacher, cached=cache, images=images)


def teacher_cache(
    spec: TrialSpec, data: Data, teacher: nn.Module, cache_dir: Path
) -> tuple[TeacherLogits | ReplayCache, int]:
    """The teacher's cache for `data` in `cache_dir`, filled where it lacks something: the replay
    cache of `spec`'s epochs under a random augmentation (each view's seed and logits), else
    the logit cache (one row per training image).

    Returns:
        The cache and the images the teacher ran on to fill it (0 when it was complete).
    """
    if data.random_augment:
        key = cache_key(spec.teacher, data)
        replay = ReplayCache(Storage.open(cache_dir), key, data.num_classes, spec.teacher.cache_topk)
        return replay, build_replay_cache(teacher, data, replay, spec.train.epochs)
    return teacher_logits(teacher, data, spec.teacher, cache_dir)


@dataclass
class StudentTraining:
    """What one process trains and steps: the student, its loss, the step (compiled, or wrapped
    in DistributedDataParallel), the optimizer and schedule, the student's exact costs, and
    the first epoch to run (after a checkpoint's)."""

    model: nn.Module
    loss_fn: nn.Module
    step_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    computed: dict[str, Any]
    first_epoch: int


def start_training(
    spec: TrialSpec, setup: TrialSetup, signal: TeacherSignal, device: torch.device, world: int
) -> StudentTraining:
    """The student, its loss and optimizer, seeded by `train.seed`, or as `setup.resume_from`
    left them (each process loads it: the optimizer's state is each rank's own)."""
    torch.manual_seed(spec.train.seed)
    model = build_student(spec.student).to(device)
    loss_fn = DistillLoss(spec.recipe, student_dim=spec.student.embed_dim, teacher_dim=signal.num_features).to(device)
    resume = setup.resume_from
    state = load_training_state(resume, spec, model, loss_fn, device) if resume is not None else None
    if state is None and setup.init_state is not None:
        model.load_state_dict(setup.init_state, strict=True)
    step_fn: nn.Module = DistillStep(model, loss_fn)
    if spec.train.compile:
        step_fn = torch.compile(step_fn)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_fn = DistributedDataParallel(step_fn, device_ids=ids, find_unused_parameters=True)
    steps_per_epoch = max(1, setup.data.num_train // spec.train.batch_size)
    optimizer, schedule = make_optimizer([model, loss_fn], spec.train, steps_per_epoch)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_rng(state, device)
    first = int(state["epoch"]) + 1 if state is not None else 1
    computed = objective_table.computed(spec.student)
    return StudentTraining(model, loss_fn, step_fn, optimizer, schedule, computed, first)


def train_trial(
    spec: TrialSpec,
    setup: TrialSetup,
    report: Report,
    *,
    signal: TeacherSignal,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """The training loop of one process: every epoch, then the student saved to `setup.workdir`.

    In a data-parallel trial (`shard` = (rank, world)) the model and the loss are wrapped in
    DistributedDataParallel; only rank 0 evaluates, reports, checkpoints and saves.

    The trial's own faults raise a TrialFault (kdsearch.train.faults): TrialDiverged,
    TrialOutOfMemory (torch's or Python's out-of-memory error during an epoch) and TrialTimedOut
    (`train.max_minutes` passed, checked at every batch boundary; in a data-parallel trial the
    ranks would not agree on the moment, so there only the worker's watchdog applies).

    Returns:
        The last epoch's metrics; on rank 0 also "checkpoint" (the weights' path) and "wall_seconds".
    """
    t_start = time.perf_counter()
    limit = TimeLimit(spec.train.max_minutes)
    rank, world = shard
    setup.data.place(device)  # in-memory images copied to the device once; every batch made there
    training = start_training(spec, setup, signal, device, world)
    # the processes that train it: the process group's own count, which exists only once every rank joined
    processes = torch.distributed.get_world_size() if world > 1 else 1
    metrics: dict[str, Any] = {}
    for epoch in range(training.first_epoch, spec.train.epochs + 1):
        check = (lambda done=epoch - 1: limit.check(done)) if world == 1 else None
        done = run_epoch(spec, setup, training, signal, device, epoch, shard, check)
        if rank != 0:
            continue
        metrics = {**done, "world_size": processes}
        report_epoch(spec, setup, training, report, metrics)
    if rank != 0:
        return metrics
    checkpoint = save_student(training.model, spec, setup.workdir)
    return {**metrics, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - t_start}


def run_epoch(
    spec: TrialSpec,
    setup: TrialSetup,
    training: StudentTraining,
    signal: TeacherSignal,
    device: torch.device,
    epoch: int,
    shard: tuple[int, int],
    check: Callable[[], None] | None,
) -> dict[str, Any]:
    """Train one epoch (1-based) over this process's shard; on rank 0 also evaluate and measure.

    Returns:
        On rank 0 the epoch's metrics: val_acc, every computed objective, the measured ones
        among `setup.objectives`, the loss parts, timings and the teacher's images; elsewhere {}.

    Raises:
        TrialOutOfMemory: torch or Python ran out of memory during the epoch.
    """
    t, data, workers = training, setup.data, setup.loader_workers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        losses = train_epoch(
            t.step_fn, signal, data, t.optimizer, t.schedule, spec.train, epoch - 1, device, workers, shard, check
        )
        train_seconds = time.perf_counter() - t0
        if shard[0] != 0:
            return {}
        throughput = efficiency(t.computed["flops"], losses["images"], train_seconds, losses["data_wait"], device)
        val_acc = evaluate(t.model, data, device, workers=workers)
        context = MeasureContext(t.model, spec, data, device, epoch, measure_objective)
        measured = objective_table.measured(setup.objectives, context)
    except OUT_OF_MEMORY as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # a reused worker runs the next trial in what this one held
        raise TrialOutOfMemory.of(e, epoch) from None
    return {
        "epoch": epoch,
        "val_acc": val_acc,
        **t.computed,
        **measured,
        "train_loss": losses.get("total", math.nan),
        **{f"loss_{k}": v for k, v in losses.items() if k not in ("total", "images", "data_wait")},
        "epoch_seconds": time.perf_counter() - t0,
        **throughput,
        "teacher_images": signal.images,
        "lr": t.schedule.get_last_lr()[0],
    }


def report_epoch(
    spec: TrialSpec, setup: TrialSetup, training: StudentTraining, report: Report, metrics: dict[str, Any]
) -> None:
    """Report an epoch's metrics, with a checkpoint folder every `setup.checkpoint_every` epochs."""
    every, t = setup.checkpoint_every, training
    if every and metrics["epoch"] % every == 0:
        folder = setup.workdir / "checkpoint"
        save_training_state(folder, metrics["epoch"], spec, t.model, t.loss_fn, t.optimizer, t.schedule)
        report(dict(metrics), checkpoint=folder)
    else:
        report(dict(metrics))
