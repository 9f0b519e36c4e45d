"""One trial: data -> teacher logits -> student -> distillation loop -> a report per epoch.

`run_trial(spec, report, workdir)` knows nothing of Ray: it calls `report(metrics)` after
every epoch, so the same function runs under Ray Tune (the report is `ray.tune.report`), in a
test (a list's `append`) or in a notebook. The teacher's logits come from the once-per-search
cache unless the recipe needs the teacher live (feature or attention distillation, or a
random training augmentation the cache can't replay).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.data import Data, evaluate, load_data
from kdsearch.distill import DistillLoss
from kdsearch.flops import count_flops
from kdsearch.specs import TrialSpec
from kdsearch.student import StudentViT, build_student
from kdsearch.teacher import TeacherLogits, load_teacher, run_teacher, teacher_logits

Report = Callable[[dict[str, Any]], None]


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite; carries the epoch (1-based) and the step it happened at."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"training diverged: loss {loss} at epoch {epoch}, step {step}")

    def __reduce__(self):  # picklable across Ray processes
        return (TrialDiverged, (self.epoch, self.step, self.loss))


def run_trial(
    spec: TrialSpec,
    report: Report,
    workdir: str | os.PathLike,
    *,
    data: Data | None = None,
    teacher: nn.Module | None = None,
    cached_logits: TeacherLogits | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    live_teacher: bool = False,
    loader_workers: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train `spec`'s student by distillation; report after each epoch; return the last metrics.

    data, teacher and cached_logits may be passed in (a search loads them once per worker);
    otherwise they are loaded here. The teacher's logits are read from (or written once to)
    `cache_dir` (default: `workdir/cache`). The final weights are saved as
    `workdir/model.safetensors` with `workdir/trial_spec.json` beside them. `live_teacher`
    runs the teacher on every batch even where the cache would do (a baseline to compare with).
    `loader_workers` are DataLoader processes for datasets read from disk (in-memory ones need none).
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(spec.train.seed)

    data = data or load_data(spec.data)
    model: StudentViT = build_student(spec.student).to(device)
    needs_teacher = spec.recipe.uses_teacher_logits
    needs_live = spec.recipe.needs_live_teacher or (needs_teacher and (data.random_augment or live_teacher))
    teacher_images = 0
    if (needs_live or (needs_teacher and cached_logits is None)) and teacher is None:
        teacher = load_teacher(spec, log=log, data=data)
    if needs_teacher and not needs_live and cached_logits is None:
        cached_logits, teacher_images = teacher_logits(teacher, data, spec.teacher, cache_dir or workdir / "cache")
    if needs_live:
        teacher = teacher.to(device)
    loss_fn = DistillLoss(
        spec.recipe, student_dim=spec.student.embed_dim, teacher_dim=getattr(teacher, "num_features", None)
    ).to(device)

    steps_per_epoch = max(1, data.num_train // spec.train.batch_size)
    optimizer = torch.optim.AdamW(_param_groups(model, loss_fn, spec.train.weight_decay), lr=spec.train.lr)
    schedule = warmup_cosine(spec.train.warmup_epochs * steps_per_epoch, spec.train.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    flops = count_flops(spec.student)

    metrics: dict[str, Any] = {}
    for epoch in range(spec.train.epochs):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        for step, (x, y, idx) in enumerate(data.train_batches(spec.train.batch_size, epoch, spec.train.seed, loader_workers)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                out = model.forward_distill(x, attn=loss_fn.needs_attention)
                t_logits = t_feats = t_attn = None
                t_prefix = 0
                if needs_live:
                    t = run_teacher(teacher, x, features=loss_fn.needs_features, attn=loss_fn.needs_attention)
                    t_logits, t_feats, t_attn, t_prefix = t.logits, t.features, t.attn, t.num_prefix_tokens
                    teacher_images += len(x)
                elif needs_teacher:
                    t_logits = cached_logits.take(idx).to(device)
                total, parts = loss_fn(
                    out.logits.float(),
                    y,
                    teacher_logits=t_logits,
                    dist_logits=None if out.dist_logits is None else out.dist_logits.float(),
                    student_tokens=out.tokens[:, spec.student.num_prefix_tokens :].float() if loss_fn.needs_features else None,
                    teacher_features=t_feats,
                    student_attn=out.attn,
                    teacher_attn=t_attn,
                    student_prefix=spec.student.num_prefix_tokens,
                    teacher_prefix=t_prefix,
                )
            if not torch.isfinite(total):
                raise TrialDiverged(epoch + 1, step, float(total.detach()))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value * len(x)
            seen += len(x)
        train_seconds = time.perf_counter() - t0
        val_acc = evaluate(model, data, device, workers=loader_workers)
        metrics = {
            "epoch": epoch + 1,
            "val_acc": val_acc,
            "train_loss": sums.get("total", math.nan) / max(seen, 1),
            **{f"loss_{k}": v / max(seen, 1) for k, v in sums.items() if k != "total"},
            "flops": flops.flops,
            "macs": flops.macs,
            "params": flops.params,
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_second": seen / train_seconds if train_seconds > 0 else math.nan,
            "teacher_images": teacher_images,
            "lr": scheduler.get_last_lr()[0],
        }
        report(dict(metrics))

    checkpoint = save_student(model, spec, workdir)
    return {**metrics, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - t_start}


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: nn.Module, loss_fn: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and conv kernels only: not on biases, norms, tokens or tables."""
    decay, no_decay = [], []
    for module in (model, loss_fn):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.ndim >= 2 and not any(s in name for s in ("token", "pos_embed", "relative_position"))
            (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_student(model: nn.Module, spec: TrialSpec, workdir: Path) -> Path:
    """model.safetensors and trial_spec.json (everything needed to rebuild it), each written then renamed."""
    from safetensors.torch import save_file

    path = workdir / "model.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    write_text_atomic(workdir / "trial_spec.json", json.dumps(spec.to_dict(), indent=2))
    return path
