"""The pieces of the training loop `run_trial` is made of: one epoch, the optimizer and its
schedule, throughput, and the teacher's signal for a batch (evaluation is
kdsearch.train.evaluation's).

Plain torch, no Ray.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdsearch.space.specs import TeacherSource, TrainSpec
from kdsearch.train.data import Data
from kdsearch.train.faults import TrialFault
from kdsearch.train.teacher import TeacherOutput, run_teacher


class TrialDiverged(TrialFault):
    """The loss became NaN or infinite; carries the epoch (1-based) and the step it happened at."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"training diverged: loss {loss} at epoch {epoch}, step {step}")

    def __reduce__(self):  # picklable across Ray processes
        return (TrialDiverged, (self.epoch, self.step, self.loss))


@dataclass
class TeacherSignal:
    """The teacher's output for a training batch, from where `teacher_source` said it comes:
    None (no teacher), the cache (looked up by the images' dataset indices: the logit cache,
    or under augmentation the replay cache's current epoch, whose seeds make the views) or the
    teacher run live. Counts the images the teacher ran on."""

    source: TeacherSource
    teacher: nn.Module | None = None  # on the training device when live
    cached: Any = None  # kdsearch.train.logit_cache.TeacherLogits (plain views)
    replay: Any = None  # kdsearch.train.replay_cache.ReplayCache (augmented views)
    features: bool = False  # live only: the teacher's final features (feature distillation)
    attn: bool = False  # live only: its last attention map (attention distillation)
    images: int = 0
    seeds: Any = None  # this epoch's view seeds, from the replay cache

    @property
    def num_features(self) -> int | None:
        return getattr(self.teacher, "num_features", None)

    @property
    def cache(self) -> Any:
        """The cache it reads from: the replay cache under augmentation, else the logit cache
        (None when the teacher runs live or there is none)."""
        return self.replay if self.replay is not None else self.cached

    def begin_epoch(self, epoch: int) -> None:
        """Read this epoch's seeds and logits from the replay cache (one epoch in memory at a time)."""
        if self.replay is not None:
            replayed = self.replay.read(epoch)
            self.seeds, self.cached = replayed.seeds, replayed.logits

    def __call__(self, x: Tensor, idx: Tensor) -> Any:
        if self.source is TeacherSource.LIVE:
            self.images += len(x)
            return run_teacher(self.teacher, x, features=self.features, attn=self.attn)
        if self.source is TeacherSource.CACHED:
            return TeacherOutput(self.cached.take(idx).to(x.device))
        return None


class DistillStep(nn.Module):
    """The student and its loss as one module: one call is one step's forward, and it is what
    DistributedDataParallel wraps in a data-parallel trial (the loss's projector included)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: Tensor, y: Tensor, teacher_out: Any) -> tuple[Tensor, dict[str, float]]:
        out = self.model.forward_distill(x, attn=self.loss_fn.needs_attention)
        return self.loss_fn(out, y, teacher_out)


def train_epoch(
    step_fn: nn.Module,
    teacher: TeacherSignal,
    data: Data,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    train: TrainSpec,
    epoch: int,
    device: torch.device,
    loader_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    check: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over the training split; returns each loss part's mean over the images seen,
    "images", and "data_wait": the seconds spent waiting for batches (loading, augmenting,
    copying to the device). Raises TrialDiverged on a non-finite loss. `check` runs after
    every step (the batch boundary where `train.max_minutes` stops a trial).

    With `shard` = (rank, world) > 1 process, each takes every world-th image of each global
    batch (`train.batch_size` images) and the returned means are over all of them."""
    world = shard[1]
    step_fn.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sums: dict[str, float] = {}
    seen, wait = 0, DataWait(device)
    teacher.begin_epoch(epoch)
    batches = iter(
        data.train_batches(train.batch_size, epoch, train.seed, loader_workers, seeds=teacher.seeds, shard=shard)
    )
    for step in itertools.count():
        wait.start()
        batch = next(batches, None)
        if batch is None:
            break
        x, y, idx = batch  # this process's share of the global batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        wait.stop()
        with autocast:
            total, parts = step_fn(x, y, teacher(x, idx))
        if not _finite_everywhere(total, world):
            raise TrialDiverged(epoch + 1, step, float(total.detach()))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value * len(x)
        seen += len(x)
        if check is not None:
            check()
    if world > 1:
        sums, seen = _summed(sums, seen, device)
    return {**{k: v / max(seen, 1) for k, v in sums.items()}, "images": seen, "data_wait": wait.seconds()}


class DataWait:
    """The time an epoch's training waited for its batches. On the CPU: the wall time spent
    getting each batch (made synchronously). On CUDA, where batches are made by kernels queued
    on the training stream: the stream's time from the end of the previous step's work to the
    batch being ready (CUDA events), which counts both a GPU idle while the CPU (or a loader's
    workers) was late and the time the device spent decoding, augmenting and resizing."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.wall, self.t0 = 0.0, 0.0
        self.begun: Any = None
        self.events: list[tuple[Any, Any]] = []  # (start, end) CUDA events of each batch

    def start(self) -> None:
        self.t0 = time.perf_counter()
        if self.cuda:
            self.begun = torch.cuda.Event(enable_timing=True)
            self.begun.record()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self.t0
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self.begun, end))

    def seconds(self) -> float:
        """The epoch's waiting, in seconds (on CUDA after the stream passed the last batch)."""
        if not self.cuda:
            return self.wall
        if self.events:
            self.events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


def _finite_everywhere(total: Tensor, world: int) -> bool:
    """The loss is finite in every process (each must stop at the same step, or the others wait)."""
    finite = torch.isfinite(total.detach()).float().reshape(1)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _summed(sums: dict[str, float], seen: int, device: torch.device) -> tuple[dict[str, float], int]:
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    values = t.tolist()
    return dict(zip(keys, values[:-1])), int(values[-1])


# Dense bf16 peak of the accelerators kdsearch is run on (vendor data sheets, FLOP/s); MFU is
# left out (NaN) on a device not named here and on CPUs.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), math.nan)


def efficiency(flops_per_image: int, images: int, train_seconds: float, data_wait: float, device: torch.device) -> dict:
    """An epoch's throughput figures: images/s, the share of the epoch spent waiting for data,
    peak device memory (bytes, NaN on CPU) and model FLOPs utilization (training costs about
    3x the forward FLOPs; NaN where the device's peak is unknown)."""
    ips = images / train_seconds if train_seconds > 0 else math.nan
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan
    return {
        "images_per_second": ips,
        "data_wait_share": data_wait / train_seconds if train_seconds > 0 else math.nan,
        "peak_memory": float(peak_memory),
        "mfu": 3 * flops_per_image * ips / device_peak_flops(device),
    }


def make_optimizer(
    modules: list[nn.Module], train: TrainSpec, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the modules' parameters (weight decay on matrices only), with linear warmup
    then cosine decay per step."""
    optimizer = torch.optim.AdamW(param_groups(modules, train.weight_decay), lr=train.lr)
    factor = warmup_cosine(train.warmup_epochs * steps_per_epoch, train.epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels only: not on biases, norms, tokens or tables."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.ndim >= 2 and not any(s in name for s in ("token", "pos_embed", "relative_position"))
            (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
