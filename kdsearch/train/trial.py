"""One trial: data -> teacher signal -> student -> distillation loop -> a report per epoch.

`run_trial(spec, report, workdir)` knows nothing of Ray: it calls `report(metrics)` after
every epoch, so the same function runs under Ray Tune (the report is `ray.tune.report`), in a
test (a list's `append`) or in a notebook. Where the teacher's signal comes from (none, the
once-per-search logit cache, or the teacher live) is `kdsearch.space.specs.teacher_source`'s rule.

Checkpoints (syne-tune's pattern): with `checkpoint_every=k`, every k-th epoch's report is
`report(metrics, checkpoint=folder)`, a local folder holding everything needed to continue
exactly (`save_training_state`); the caller copies it during the call (Ray Tune's
`tune.report(..., checkpoint=tune.Checkpoint.from_directory(folder))` does). `resume_from=folder`
starts from such a folder: the next epoch is its epoch + 1, and the weights, the loss's
projectors, the optimizer, the LR schedule and torch's RNG are as they were, so the trial
ends with the weights of an uninterrupted one (training batches are a function of (seed, epoch)).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.models.student import build_student
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import MeasureContext, Objective
from kdsearch.space.specs import TeacherSource, TrialSpec, teacher_source
from kdsearch.train.data import Data, load_data
from kdsearch.train.distill import DistillLoss
from kdsearch.train.faults import OUT_OF_MEMORY, TimeLimit, TrialFault, TrialOutOfMemory, TrialTimedOut
from kdsearch.train.measure import measure_objective
from kdsearch.train.loop import (
    DistillStep,
    TeacherSignal,
    TrialDiverged,
    efficiency,
    evaluate,
    make_optimizer,
    train_epoch,
)

__all__ = [
    "Report",
    "TrialDiverged",
    "TrialFault",
    "TrialOutOfMemory",
    "TrialTimedOut",
    "load_training_state",
    "run_trial",
    "save_student",
    "save_training_state",
    "teacher_signal",
    "train_trial",
    "trial_device",
]

# report(metrics), or report(metrics, checkpoint=folder) on a checkpoint epoch
Report = Callable[..., None]
TRAINING_STATE = "training_state.pt"
# Whether this process has said that the GPUs it was given are not visible to torch (said once per process)
_said_no_cuda = False


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def trial_device(gpu_ids: Sequence[int | str] = (), say: Callable[[str], None] = _to_stderr) -> torch.device:
    """The device a trial trains on: CUDA when torch sees it, else the CPU.

    `gpu_ids` are the GPUs this process was given (Ray's `ray.get_gpu_ids()`, which Ray also
    puts in CUDA_VISIBLE_DEVICES): given some while torch sees no CUDA (a CPU build of torch, no
    driver, or GPUs a node only declares), the process says so in one line, once whatever
    number of trials it runs, and the trial trains on the CPU."""
    global _said_no_cuda
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpu_ids and not _said_no_cuda:
        _said_no_cuda = True
        why = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} finds no CUDA device here"
        )
        given = f"GPU{'s' if len(gpu_ids) > 1 else ''} {','.join(map(str, gpu_ids))}"
        say(
            f"kdsearch: this trial was given {given} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}) but {why}: training on the CPU"
        )
    return torch.device("cpu")


def run_trial(
    spec: TrialSpec,
    report: Report,
    workdir: str | os.PathLike,
    *,
    data: Data | None = None,
    teacher: nn.Module | None = None,
    cached_logits: Any = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    live_teacher: bool = False,
    loader_workers: int = 0,
    objectives: Sequence[Objective] = (),
    log: Callable[[str], None] = lambda s: None,
    world_size: int = 1,
    checkpoint_every: int = 0,
    resume_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train `spec`'s student by distillation; report after each epoch; return the last metrics.

    data, teacher and cached_logits may be passed in (a search loads them once per worker;
    `cached_logits` is a TeacherLogits, or a ReplayCache when the data's augmentation is
    random); otherwise they are loaded here. The teacher's logits (or, under augmentation, the
    replay cache of this trial's epochs) are read from or written once to `cache_dir`
    (default: `workdir/cache`). `live_teacher` runs the teacher on every batch
    even where the cache would do (a baseline to compare with). `loader_workers` are
    DataLoader processes for datasets read from disk (in-memory ones need none). Each report
    holds val_acc, every computed objective (FLOPs, MACs, params), the measured ones among
    `objectives`, the loss parts, timings and world_size (the processes training it). The final weights are saved as
    `workdir/model.safetensors` with `workdir/trial_spec.json` beside them.

    `world_size` > 1 trains data-parallel in that many processes (one GPU each, or CPUs with
    gloo): each takes its share of every global batch of `train.batch_size` images, and this
    process (rank 0) reports, evaluates and saves (kdsearch.train.parallel).
    `device` defaults to `trial_device()`: CUDA when torch sees it, else the CPU.

    `checkpoint_every` > 0 hands a checkpoint folder with every k-th epoch's report;
    `resume_from` continues from one (see the module doc).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = data or load_data(spec.data)
    if world_size > 1:
        from kdsearch.train.parallel import run_data_parallel

        return run_data_parallel(
            world_size, spec, report, workdir, data=data, teacher=teacher, cached_logits=cached_logits,
            cache_dir=cache_dir, live_teacher=live_teacher, loader_workers=loader_workers, objectives=objectives,
            log=log, checkpoint_every=checkpoint_every, resume_from=resume_from,
        )  # fmt: skip
    device = torch.device(device) if device is not None else trial_device()
    source = teacher_source(spec.recipe, live=live_teacher)
    signal = teacher_signal(
        spec, source, data, device, teacher, cached_logits, Path(cache_dir or workdir / "cache"), log
    )
    resume = Path(resume_from) if resume_from is not None else None
    return train_trial(
        spec, report, workdir, data, signal, device, loader_workers, objectives, (0, 1), checkpoint_every, resume
    )


def train_trial(
    spec: TrialSpec,
    report: Report,
    workdir: Path | None,
    data: Data,
    signal: TeacherSignal,
    device: torch.device,
    loader_workers: int = 0,
    objectives: Sequence[Objective] = (),
    shard: tuple[int, int] = (0, 1),
    checkpoint_every: int = 0,
    resume: Path | None = None,
) -> dict[str, Any]:
    """The training loop of one process: every epoch, then the weights saved to `workdir`.
    In a data-parallel trial (`shard` = (rank, world)) the model and the loss are wrapped in
    DistributedDataParallel; only rank 0 evaluates, reports, checkpoints and saves (`workdir`
    None elsewhere); every rank continues from `resume` (the optimizer's state is each rank's own).

    The trial's own faults raise a TrialFault (kdsearch.train.faults): TrialDiverged,
    TrialOutOfMemory (torch's or Python's out-of-memory error during an epoch) and TrialTimedOut
    (`train.max_minutes` passed, checked at every batch boundary; in a data-parallel trial the
    ranks would not agree on the moment, so there only the worker's watchdog applies)."""
    t_start = time.perf_counter()
    limit = TimeLimit(spec.train.max_minutes)
    rank, world = shard
    torch.manual_seed(spec.train.seed)
    model = build_student(spec.student).to(device)
    loss_fn = DistillLoss(spec.recipe, student_dim=spec.student.embed_dim, teacher_dim=signal.num_features).to(device)
    state = load_training_state(resume, spec, model, loss_fn, device) if resume is not None else None
    step_fn: nn.Module = DistillStep(model, loss_fn)
    if spec.train.compile:
        step_fn = torch.compile(step_fn)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_fn = DistributedDataParallel(step_fn, device_ids=ids, find_unused_parameters=True)
    steps_per_epoch = max(1, data.num_train // spec.train.batch_size)
    optimizer, schedule = make_optimizer([model, loss_fn], spec.train, steps_per_epoch)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        _set_rng(state, device)
    computed = objective_table.computed(spec.student)
    # the processes that train it: the process group's own count, which exists only once every rank joined
    processes = torch.distributed.get_world_size() if world > 1 else 1

    metrics: dict[str, Any] = {}
    first = int(state["epoch"]) + 1 if state is not None else 1
    for epoch in range(first, spec.train.epochs + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        check = (lambda done=epoch - 1: limit.check(done)) if world == 1 else None
        try:
            losses = train_epoch(
                step_fn, signal, data, optimizer, schedule, spec.train, epoch - 1, device, loader_workers, shard, check
            )
            train_seconds = time.perf_counter() - t0
            if rank != 0:
                continue
            throughput = efficiency(computed["flops"], losses["images"], train_seconds, losses["data_wait"], device)
            val_acc = evaluate(model, data, device, workers=loader_workers)
            measured = objective_table.measured(objectives, MeasureContext(model, spec, data, device, epoch, measure_objective))
        except OUT_OF_MEMORY as e:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # a reused worker runs the next trial in what this one held
            raise TrialOutOfMemory.of(e, epoch) from None
        metrics = {
            "epoch": epoch,
            "val_acc": val_acc,
            **computed,
            **measured,
            "train_loss": losses.get("total", math.nan),
            **{f"loss_{k}": v for k, v in losses.items() if k not in ("total", "images", "data_wait")},
            "epoch_seconds": time.perf_counter() - t0,
            **throughput,
            "teacher_images": signal.images,
            "lr": schedule.get_last_lr()[0],
            "world_size": processes,
        }
        if checkpoint_every and epoch % checkpoint_every == 0 and workdir is not None:
            folder = save_training_state(workdir / "checkpoint", epoch, spec, model, loss_fn, optimizer, schedule)
            report(dict(metrics), checkpoint=folder)
        else:
            report(dict(metrics))

    if workdir is None:
        return metrics
    checkpoint = save_student(model, spec, workdir)
    return {**metrics, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - t_start}


def teacher_signal(
    spec: TrialSpec,
    source: TeacherSource,
    data: Data,
    device: torch.device,
    teacher: nn.Module | None,
    cached_logits: Any,
    cache_dir: Path,
    log: Callable[[str], None],
) -> TeacherSignal:
    """The teacher's signal for `source`: loads the teacher only when it must run (live, or to
    fill a cache the caller did not pass), and reads or fills the logit cache once."""
    if source is TeacherSource.NONE:
        return TeacherSignal(source)
    teacher_images = 0
    if teacher is None and (source is TeacherSource.LIVE or cached_logits is None):
        from kdsearch.train.teacher import load_teacher

        teacher = load_teacher(spec, log=log, data=data)
    if source is TeacherSource.CACHED and cached_logits is None:
        from kdsearch.storage import Storage
        from kdsearch.train.logit_cache import cache_key, teacher_logits
        from kdsearch.train.replay_cache import ReplayCache, build_replay_cache

        if data.random_augment:
            key = cache_key(spec.teacher, data)
            cached_logits = ReplayCache(Storage.open(cache_dir), key, data.num_classes, spec.teacher.cache_topk)
            teacher_images = build_replay_cache(teacher, data, cached_logits, spec.train.epochs)
        else:
            cached_logits, teacher_images = teacher_logits(teacher, data, spec.teacher, cache_dir)
    if source is TeacherSource.LIVE:
        r = spec.recipe
        return TeacherSignal(source, teacher=teacher.to(device), features=r.needs_features, attn=r.needs_attention)
    if data.random_augment and source is TeacherSource.CACHED:
        return TeacherSignal(source, teacher=teacher, replay=cached_logits, images=teacher_images)
    return TeacherSignal(source, teacher=teacher, cached=cached_logits, images=teacher_images)


def save_student(model: nn.Module, spec: TrialSpec, workdir: Path) -> Path:
    """model.safetensors and trial_spec.json (everything needed to rebuild it), each written then renamed."""
    from safetensors.torch import save_file

    path = workdir / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    write_text_atomic(workdir / "trial_spec.json", json.dumps(spec.to_dict(), indent=2))
    return path


def save_training_state(
    folder: Path,
    epoch: int,
    spec: TrialSpec,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """A checkpoint folder: the student's weights and spec as `save_student` writes them (so a
    checkpoint is also a usable student) and training_state.pt (the epoch, the loss module's
    weights, the optimizer's and the schedule's state, torch's RNG), tensors only: it loads
    with `torch.load(weights_only=True)`. Rewrites `folder` in place, each file written then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "loss_fn": {k: v.detach().cpu() for k, v in loss_fn.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(folder / TRAINING_STATE) as tmp:
        torch.save(state, tmp)
    save_student(model, spec, folder)
    return folder


def load_training_state(
    folder: Path, spec: TrialSpec, model: nn.Module, loss_fn: nn.Module, device: torch.device
) -> dict[str, Any]:
    """Load a checkpoint folder's weights into `model` and `loss_fn`; returns the rest of its
    state (epoch, optimizer, schedule, RNG) for the loop. The checkpoint must be `spec`'s."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "trial_spec.json").read_text())
    if saved != json.loads(json.dumps(spec.to_dict())):
        raise ValueError(f"{folder}: the checkpoint is of another trial spec")
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
    state = torch.load(folder / TRAINING_STATE, map_location=device, weights_only=True)
    loss_fn.load_state_dict(state["loss_fn"])
    return state


def _set_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
