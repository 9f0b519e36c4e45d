"""The supernet of one-shot screening (kdsearch.models.supernet): its training and its scoring.

`train_supernet` trains one supernet for a space with the sandwich rule: each step runs the
largest, the smallest and two random students on the same batch, accumulates their gradients
and takes one optimizer step; every one of them builds and meets the space's budget
(kdsearch.models.sandwich), so the supernet serves only students a search may train. The loss is the space's default recipe with the
teacher's cached signal (`kdsearch.train.training.teacher_signal`: the logit cache, or the
replay cache under a random augmentation), the label and the soft-KL / hard terms only: a
supernet cannot screen loss weights, and feature and attention distillation would need the
teacher live (their weights are set to 0). The optimizer, its schedule, the batch size and
the seed are the space's `train` defaults, the schedule spread over the supernet's epochs.

A state (`save` after each epoch, `state=` to continue) holds the epoch, the weights, the
optimizer and schedule and torch's RNG; the batches are a function of (seed, epoch) and each
step's students of (seed, epoch, step), so a continued run trains as an uninterrupted one.

`score_subnets` scores students with the inherited weights (val accuracy, no training): each
val batch is made once and run through every student, in eval mode under inference mode.

With `setup.world_size` > 1 it trains data-parallel as a trial does (kdsearch.train.parallel):
N processes, one device each, the sandwich's four students one forward of DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdsearch.errors import KdsearchError
from kdsearch.models.sandwich import SandwichRule, extreme_student
from kdsearch.models.supernet import Supernet, SupernetSpec
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import StudentSpec, TrialSpec
from kdsearch.train.checkpoint import restore_rng
from kdsearch.train.data import Data
from kdsearch.train.distill import DistillLoss
from kdsearch.train.loop import TeacherSignal, TrialDiverged, make_optimizer
from kdsearch.train.parallel import COLLECTIVE_TIMEOUT, check_fits, check_ranks, end_ranks
from kdsearch.train.replay_cache import ReplayCache, build_replay_cache
from kdsearch.train.setup import TrialSetup, quiet
from kdsearch.train.teacher import load_teacher
from kdsearch.train.training import teacher_signal

__all__ = ["SANDWICH", "load_supernet", "score_subnets", "start_supernet", "supernet_trial_spec", "train_supernet"]

SANDWICH = 4  # students per step: the largest, the smallest and two random ones
SCORE_BATCH = 512  # val images per scoring batch


def supernet_trial_spec(space: SearchSpace, epochs: int) -> TrialSpec:
    """The trial spec whose recipe and training settings the supernet trains with: every
    dimension at its default, feature and attention distillation off, `epochs` epochs."""
    spec = space.build({name: dim.default for name, dim in space.dims.items()})
    recipe = dataclasses.replace(spec.recipe, feature_weight=0.0, attention_weight=0.0)
    return dataclasses.replace(spec, recipe=recipe, train=dataclasses.replace(spec.train, epochs=epochs))


def autocast_on(device: torch.device) -> Any:
    """bf16 autocast on CUDA (as trials train and evaluate), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def step_students(rule: SandwichRule, seed: int, epoch: int, step: int) -> list[StudentSpec]:
    """The sandwich of one step: a function of (seed, epoch, step), so a continued run draws the same."""
    return rule(np.random.default_rng([seed, epoch, step]), SANDWICH)


def report_students(rule: SandwichRule) -> tuple[StudentSpec, StudentSpec]:
    """The largest (within the budget) and the smallest student that every epoch's report
    scores (fixed encodings)."""
    rng = np.random.default_rng(0)
    return rule.largest(rng), extreme_student(rule.space, rng, largest=False)


def prepared_signal(spec: TrialSpec, setup: TrialSetup, device: torch.device) -> TeacherSignal:
    """The teacher's signal for the supernet's recipe; a replay cache the setup carries gets the
    epochs it lacks (the supernet may train longer than the trials it was filled for)."""
    signal = teacher_signal(spec, setup, device)
    replay = signal.replay
    if isinstance(replay, ReplayCache) and replay.missing(spec.train.epochs):
        teacher = signal.teacher or load_teacher(spec, log=setup.log, data=setup.data)
        signal.images += build_replay_cache(teacher, setup.data, replay, spec.train.epochs)
    return signal


class SandwichStep(nn.Module):
    """The sandwich's students on one batch as one call: their losses `(S,)`, summed for one
    backward. What DistributedDataParallel wraps: one forward and one gradient sync per step,
    the parameters no student of the step used found unused."""

    def __init__(self, net: Supernet, loss_fn: DistillLoss):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, x: Tensor, y: Tensor, teacher_out: Any, students: list[StudentSpec]) -> Tensor:
        return torch.stack([self.loss_fn(self.net.forward_distill(x, s), y, teacher_out)[0] for s in students])


def supernet_epoch(
    rule: SandwichRule,
    spec: TrialSpec,
    step_fn: nn.Module,
    parts: tuple[torch.optim.Optimizer, Any],
    signal: TeacherSignal,
    data: Data,
    epoch: int,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """One epoch (1-based) of sandwich steps over this process's shard of each batch. Returns
    the mean loss per student and image (over every process), the images and the seconds."""
    optimizer, schedule = parts
    device, train, world = data.device, spec.train, shard[1]
    step_fn.train()
    t0, sums = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images
    signal.begin_epoch(epoch - 1)
    batches = data.train_batches(train.batch_size, epoch - 1, train.seed, seeds=signal.seeds, shard=shard)
    for step, (x, y, idx) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_on(device):
            losses = step_fn(x, y, signal(x, idx), step_students(rule, train.seed, epoch, step))
        finite = torch.isfinite(losses.detach()).all().float().reshape(1)
        if world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # every rank stops at once
        if not finite.item():
            raise TrialDiverged(epoch, step, float(losses.detach().sum()))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the sandwich's gradients accumulate into one step
        optimizer.step()
        schedule.step()
        sums += torch.stack([losses.detach().double().sum() * len(x), torch.tensor(len(x), device=device)])
    if world > 1:
        torch.distributed.all_reduce(sums)
    seen = int(sums[1])
    return {"loss": float(sums[0]) / max(seen * SANDWICH, 1), "images": seen, "seconds": time.perf_counter() - t0}


def training_state(epoch: int, spec: SupernetSpec, net: Supernet, optimizer: Any, schedule: Any) -> dict[str, Any]:
    """What `save` is given: tensors, numbers and strings only (loads with `weights_only=True`)."""
    return {
        "epoch": epoch,
        "spec": dataclasses.asdict(spec),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def start_supernet(
    space: SearchSpace, spec: TrialSpec, num_train: int, state: dict | None, device: torch.device
) -> tuple[Supernet, torch.optim.Optimizer, Any]:
    """The supernet (seeded by `train.seed`), its optimizer and schedule, as `state` left them when given."""
    torch.manual_seed(spec.train.seed)
    net = Supernet(SupernetSpec.of_space(space))
    if state is not None:
        net.load_state_dict(state["model"])
    net.to(device)
    optimizer, schedule = make_optimizer([net], spec.train, max(1, num_train // spec.train.batch_size))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_rng(state, device)
    return net, optimizer, schedule


def train_supernet(
    space: SearchSpace,
    setup: TrialSetup,
    epochs: int,
    report: Callable[[dict], None],
    state: dict | None = None,
    save: Callable[[dict], None] | None = None,
    threads: int | None = None,
) -> Supernet:
    """Train the supernet of `space` with the sandwich rule (see the module docstring).

    Args:
        space: the space whose students the supernet holds.
        setup: the data (`setup.data`, loaded), the teacher's cache (`setup.cached_logits`; else
            read or filled in `setup.teacher_cache_dir`), the device (default: CUDA when torch
            sees it); `setup.world_size` > 1 trains in that many processes, one GPU each.
        epochs: the epochs to train in all (a continued run trains those after `state`'s).
        report: called after each epoch with {"epoch", "loss" (the mean per student and image),
            "seconds" (the epoch's training and scoring), "images_per_s" (training images per
            second, each through the sandwich's students), "largest_val_acc", "smallest_val_acc"}.
        state: the last state `save` was given: training continues after its epoch, exactly.
        save: called after each epoch with the state to continue from (a `torch.save`-able dict).
        threads: torch's intra-op threads while it trains (the CPUs its task was given; shared
            among the processes of a data-parallel run); None keeps the process's setting.

    Returns:
        The trained supernet, in eval mode.
    """
    if setup.data is None:
        raise KdsearchError("train_supernet needs setup.data loaded")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        if setup.world_size > 1:
            return train_supernet_parallel(space, setup, epochs, report, state, save)
        device = setup.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return supernet_loop(space, setup, epochs, report, state, save, device)
    finally:
        torch.set_num_threads(saved_threads)


def supernet_loop(
    space: SearchSpace,
    setup: TrialSetup,
    epochs: int,
    report: Callable[[dict], None],
    state: dict | None,
    save: Callable[[dict], None] | None,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> Supernet:
    """The epochs of one process (`shard` = (rank, world)); only rank 0 scores, saves and reports."""
    rank, world = shard
    data, spec = setup.data.place(device), supernet_trial_spec(space, epochs)  # type: ignore[union-attr]
    net, optimizer, schedule = start_supernet(space, spec, data.num_train, state, device)
    step_fn: nn.Module = SandwichStep(net, DistillLoss(spec.recipe).to(device))
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_fn = DistributedDataParallel(step_fn, device_ids=ids, find_unused_parameters=True)
    signal = prepared_signal(spec, setup, device)
    rule = SandwichRule(space)
    largest, smallest = report_students(rule)
    for epoch in range(int(state["epoch"]) + 1 if state is not None else 1, epochs + 1):
        t0 = time.perf_counter()
        done = supernet_epoch(rule, spec, step_fn, (optimizer, schedule), signal, data, epoch, shard)
        if rank != 0:
            continue
        accs = score_subnets(net, [largest, smallest], data, device)
        if save is not None:
            save(training_state(epoch, net.spec, net, optimizer, schedule))
        report(
            {
                "epoch": epoch,
                "loss": done["loss"],
                "seconds": time.perf_counter() - t0,
                "images_per_s": done["images"] / done["seconds"] if done["seconds"] > 0 else math.nan,
                "largest_val_acc": accs[0],
                "smallest_val_acc": accs[1],
            }
        )
    return net.eval()


# --------------------------------------------------------------------------- data-parallel


def join_group(rank: int, world: int, init: str) -> torch.device:
    """Join the supernet's process group (NCCL on GPU `rank`, else gloo over loopback); returns the device."""
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=init, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    return device


def rank_main(
    rank: int, init: str, threads: int, space: SearchSpace, setup: TrialSetup, epochs: int, state: dict | None
) -> None:
    """Ranks 1..N-1: train their share; score, save and report nothing."""
    torch.set_num_threads(threads)
    device = join_group(rank, setup.world_size, init)
    try:
        supernet_loop(space, setup, epochs, lambda r: None, state, None, device, (rank, setup.world_size))
    finally:
        torch.distributed.destroy_process_group()


def train_supernet_parallel(
    space: SearchSpace,
    setup: TrialSetup,
    epochs: int,
    report: Callable[[dict], None],
    state: dict | None,
    save: Callable[[dict], None] | None,
) -> Supernet:
    """`train_supernet` in `setup.world_size` processes, one GPU each (gloo on CPUs), as
    kdsearch.train.parallel trains a trial: this process is rank 0, prepares the teacher's
    signal once and starts ranks 1..N-1 (spawned); each takes every N-th image of each batch
    and DistributedDataParallel averages the sandwich's gradients, so it follows one process's curve."""
    world, spec = setup.world_size, supernet_trial_spec(space, epochs)
    check_fits(spec, world)
    signal = prepared_signal(spec, setup, torch.device("cpu"))
    setup = dataclasses.replace(setup, teacher=signal.teacher, cached_logits=signal.cache)
    shared = dataclasses.replace(setup, log=quiet, device=None, objectives=())
    setup.workdir.mkdir(parents=True, exist_ok=True)
    init = (setup.workdir / f"supernet-group-{uuid.uuid4().hex}").resolve().as_uri()  # a FileStore: no port to pick
    threads, saved_threads = max(1, torch.get_num_threads() // world), torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    others = [
        context.Process(target=rank_main, args=(r, init, threads, space, shared, epochs, state), daemon=True)
        for r in range(1, world)
    ]
    for p in others:
        p.start()
    torch.set_num_threads(threads)
    try:
        device = join_group(0, world, init)
        try:
            net = supernet_loop(space, setup, epochs, report, state, save, device, (0, world))
        finally:
            torch.distributed.destroy_process_group()
    finally:
        torch.set_num_threads(saved_threads)
        end_ranks(others)
    check_ranks(others)
    return net


def load_supernet(space: SearchSpace, state: dict) -> Supernet:
    """The supernet a training state holds (on the CPU, in eval mode).

    Raises:
        ValueError: the state is of another space's supernet.
    """
    spec = SupernetSpec.of_space(space)
    saved = state.get("spec")
    if saved is not None and saved != dataclasses.asdict(spec):
        raise ValueError(f"the supernet state is of another space's supernet ({saved}, not {spec})")
    net = Supernet(spec)
    net.load_state_dict(state["model"])
    return net.eval()


def score_subnets(
    supernet: Supernet, students: Sequence[StudentSpec], data: Data, device: torch.device | None = None
) -> list[float]:
    """The val accuracy in [0, 1] of each student with the supernet's weights, no training.

    Every val batch is made once and run through each student (eval mode, inference mode,
    bf16 autocast on CUDA as trials evaluate); the supernet's mode is restored after.

    Args:
        supernet: the trained supernet, on `device`.
        students: subnets of it.
        data: the data whose val split scores them.
        device: where it runs (default: the supernet's device).

    Returns:
        One accuracy per student, in order.
    """
    device = torch.device(device) if device is not None else supernet.cls_token.device
    data.place(device)
    was_training = supernet.training
    supernet.eval()
    correct: list[Tensor] = [torch.zeros((), dtype=torch.long, device=device) for _ in students]
    total = 0
    try:
        with torch.inference_mode(), autocast_on(device):
            for x, y, _ in data.val_batches(SCORE_BATCH):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for i, student in enumerate(students):
                    correct[i] += (supernet(x, student).argmax(-1) == y).sum()
                total += len(y)
    finally:
        supernet.train(was_training)
    return [int(c) / max(total, 1) for c in correct]
