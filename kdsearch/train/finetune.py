"""Fine-tuning a pretrained timm model into a space's teacher (`kdsearch teacher finetune`).

The space's `teacher.model` starts from timm's pretrained weights (read by timm's own
pretrained config: the hub, or `teacher.pretrained_file` as the config's file) or from a
checkpoint that this command did not write, with a new head for the data's classes (timm
drops a classifier of another size), its stem adapted to the data's channels and, for a ViT,
its position table resampled to the data's image size. It trains on the space's train split
only (val gives each epoch's accuracy; the test split is never read) with the usual recipe:
AdamW, a linear warmup then a cosine decay per step, bf16 autocast on CUDA, layer-wise lr
decay for ViTs, label smoothing. Progress comes as lines, the weights and their YAML at the
end (`run_finetune`), so the same generator runs here and in a Ray task (kdsearch.search.finetune_task).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.errors import KdsearchError
from kdsearch.space.specs import BUILTIN_TEACHER, DataSpec, TeacherSpec
from kdsearch.train.data import Data, load_data
from kdsearch.train.evaluation import evaluate
from kdsearch.train.splits import in_memory
from kdsearch.train.teacher import (
    check_timm_name,
    checkpoint_classes,
    pretrained_model,
    read_checkpoint,
    teacher_meta,
    timm_kwargs,
)

FINETUNED_BY = "kdsearch teacher finetune"
"""The `made_by` of the YAML beside a teacher this module made: such a checkpoint is never a starting point."""


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the teacher is fine-tuned; the command's options, each with its default here."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4  # AdamW's peak learning rate (the head's; lower layers of a ViT get less)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warmup from 0 over these epochs (at most all of them), then a cosine decay to 0
    layer_decay: float = 0.75  # a ViT's lr falls by this factor per block below the head; 1: off
    label_smoothing: float = 0.1
    seed: int = 0

    def problems(self) -> list[str]:
        """`--option: must be ...` for each value outside what it allows; empty when none."""
        rules = {
            "epochs": (self.epochs >= 1, "an integer >= 1"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "lr": (self.lr > 0, "a number > 0"),
            "weight_decay": (self.weight_decay >= 0, "a number >= 0"),
            "warmup_epochs": (self.warmup_epochs >= 0, "a number >= 0"),
            "layer_decay": (0 < self.layer_decay <= 1, "a number in (0, 1]"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "a number in [0, 1)"),
        }
        return [
            f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}"
            for name, (ok, allowed) in rules.items()
            if not ok
        ]


@dataclass
class FinetuneResult:
    """The fine-tuned teacher's weights (on the CPU) and the YAML that goes beside them."""

    state: dict[str, Tensor]
    meta: dict[str, Any]


def check_finetunable(tspec: TeacherSpec) -> None:
    """Raises KdsearchError (one line) for the built-in teacher, which `teacher train` trains,
    and for a teacher with no checkpoint to save to."""
    if tspec.model == BUILTIN_TEACHER:
        raise KdsearchError(
            f"teacher.model: {BUILTIN_TEACHER} is trained by `kdsearch teacher train SPACE`; "
            "`teacher finetune` fine-tunes a timm model"
        )
    if not tspec.checkpoint:
        raise KdsearchError("teacher.checkpoint: give the path the fine-tuned teacher is saved to")


def starting_point(tspec: TeacherSpec, force: bool) -> str:
    """Where fine-tuning starts: "pretrained" (timm's pretrained config), or "checkpoint" (an
    existing checkpoint this command did not write, replaced only with `force`).

    Raises:
        KdsearchError: the teacher cannot be fine-tuned (`check_finetunable`), or nothing to start from is given.
    """
    check_finetunable(tspec)
    if tspec.pretrained:
        return "pretrained"
    path = Path(tspec.checkpoint or "")
    if force and path.is_file() and teacher_meta(path).get("made_by") != FINETUNED_BY:
        return "checkpoint"
    raise KdsearchError(
        f"teacher.pretrained: nothing to fine-tune {tspec.model} from; set pretrained: true "
        "(timm's weights from the hub, or teacher.pretrained_file: a local copy of them)"
    )


def initial_model(tspec: TeacherSpec, dspec: DataSpec, start: str) -> tuple[nn.Module, str]:
    """The model fine-tuning starts from, with a new head for the data's classes, and a line
    saying where its weights came from.

    Args:
        tspec: The teacher (a timm model).
        dspec: The data.
        start: `starting_point`'s answer.

    Returns:
        (model in train mode, its source in words).
    """
    check_timm_name(tspec.model)
    kwargs = timm_kwargs(tspec.model, dspec)
    if start == "pretrained":
        where = tspec.pretrained_file or "the hub"
        return pretrained_model(tspec, kwargs), f"timm's pretrained weights ({where})"
    # the checkpoint's own head size, so timm drops it whenever it differs from the data's
    import timm

    path = Path(tspec.checkpoint or "")
    state = read_checkpoint(path)
    with torch.device("meta"):
        probe = timm.create_model(tspec.model, pretrained=False)
    classes = checkpoint_classes(probe, state)
    overlay = {"state_dict": state, "num_classes": classes if classes is not None else -1}
    return pretrained_model(tspec, kwargs, overlay), f"the checkpoint {path}"


def is_vit(model: nn.Module) -> bool:
    """A transformer with a patch embedding and blocks: layer-wise lr decay applies to it."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def make_optimizer(model: nn.Module, recipe: FinetuneRecipe) -> torch.optim.Optimizer:
    """AdamW through timm.optim: no weight decay on biases and norms; for a ViT each block's lr
    scaled by layer_decay ** (its distance from the head)."""
    from timm.optim import create_optimizer_v2

    decay = recipe.layer_decay if is_vit(model) and recipe.layer_decay < 1 else None
    return create_optimizer_v2(model, "adamw", lr=recipe.lr, weight_decay=recipe.weight_decay, layer_decay=decay)


def warmup_cosine(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr: a linear rise over `warmup_steps` (at most `total_steps`), then a cosine
    to 0 at `total_steps` (stepped once per optimizer step); a group's layer-decay scale stays applied."""
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    for group in opt.param_groups:  # timm keeps the layer-decay scale in "lr_scale"
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def finetune_device() -> tuple[torch.device, str]:
    """CUDA's first device when there is one, else the CPU; and the line that says which and in
    what precision."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"fine-tuning on {torch.cuda.get_device_name(0)} in bf16 autocast"
    return torch.device("cpu"), "fine-tuning on the CPU in fp32 (no CUDA device here; bf16 autocast is for GPUs)"


def run_finetune(
    tspec: TeacherSpec, dspec: DataSpec, recipe: FinetuneRecipe, force: bool = False, data: Data | None = None
) -> Iterator[str | FinetuneResult]:
    """Fine-tune the space's teacher: its progress lines (where it runs, one per epoch), then
    the result.

    Args:
        tspec: The space's teacher section (a timm model and its weights' source).
        dspec: The space's data section.
        recipe: The fine-tuning recipe.
        force: An existing checkpoint this command did not write may be the starting point.
        data: The data already loaded, else loaded here (from `dspec`, on this node).

    Yields:
        Progress lines, then one FinetuneResult.
    """
    start = starting_point(tspec, force)
    data = data or load_data(dspec)
    torch.manual_seed(recipe.seed)
    model, source = initial_model(tspec, dspec, start)
    device, where = finetune_device()
    yield f"{where}: {tspec.model} from {source}, a new head for {data.num_classes} classes"
    model.to(device)
    data.place(device)  # in-memory images copied there once, every batch made there
    opt = make_optimizer(model, recipe)
    per_epoch = max(1, data.num_train // recipe.batch_size if data.num_train > recipe.batch_size else 1)
    sched = warmup_cosine(opt, round(recipe.warmup_epochs * per_epoch), recipe.epochs * per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    workers = 0 if in_memory(data.train) else max(0, min(8, (os.cpu_count() or 1) - 1))  # DataLoader processes
    t0, acc = time.perf_counter(), 0.0
    for epoch in range(recipe.epochs):
        model.train()
        t_epoch, images, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
        for x, y, _ in data.train_batches(recipe.batch_size, epoch, recipe.seed, workers=workers):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().float() * len(y)
            images += len(y)
        train_loss = float(loss_sum) / max(images, 1)  # waits for the device's last step
        seconds = time.perf_counter() - t_epoch
        acc = evaluate(model, data, device, batch_size=max(256, recipe.batch_size), workers=workers)
        yield (
            f"epoch {epoch + 1}/{recipe.epochs}: train loss {train_loss:.4f}, val_acc {acc:.4f}, "
            f"{images / max(seconds, 1e-9):,.0f} images/s, {time.perf_counter() - t0:.1f} s"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    yield FinetuneResult(state, finetune_meta(tspec, data, recipe, acc, source, time.perf_counter() - t0))


def finetune_meta(
    tspec: TeacherSpec, data: Data, recipe: FinetuneRecipe, val_acc: float, source: str, seconds: float
) -> dict[str, Any]:
    """The YAML beside a fine-tuned teacher: what it is, the data it learned (the training
    split's fingerprint, checked by every search that loads it), its val accuracy and how it was made."""
    d = data.spec
    return {
        "model": tspec.model,
        "made_by": FINETUNED_BY,
        "source": source,
        "data": d.name,
        "img_size": d.img_size,
        "in_chans": data.in_chans,
        "num_classes": data.num_classes,
        "val_acc": float(val_acc),
        "train_fingerprint": data.fingerprint,
        "recipe": asdict(recipe),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "seconds": round(seconds, 1),
    }
