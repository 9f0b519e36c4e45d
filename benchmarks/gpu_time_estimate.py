"""The time each step of a space's walk-through takes on one GPU, computed from exact FLOPs.

This is an estimate, not a measurement: for a machine without a GPU, the README's walk-through
gives these figures and says so. Each step's FLOPs are exact (the teacher counted by
torch's FlopCounterMode on timm's explicit attention path, the students by kdsearch's
`count_flops`); the time is FLOPs / (peak x efficiency), with a training step costing three
forward passes (forward, and a backward of twice its FLOPs).

NOTE: small students use a GPU far less well than a ViT-B (short matmuls, launch overhead), so
the two get their own efficiency; both are stated in the output and are the estimate's main
uncertainty. `benchmarks/gpu_check.sh` measures the real figures on a machine that has a GPU.

    .venv/bin/python benchmarks/gpu_time_estimate.py search_spaces/cifar10_vit_tiny.yaml
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.space.datasets import DATASETS
from kdsearch.space.file import load_space
from kdsearch.space.flops import count_flops

TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagefolder": 1_281_167}  # before val is carved
TEST_IMAGES = {"cifar10": 10_000, "cifar100": 10_000, "imagefolder": 50_000}


def teacher_forward_flops(model: str, num_classes: int, in_chans: int, img_size: int) -> int:
    """One image's forward FLOPs through the timm teacher, attention matmuls included."""
    kwargs = {"img_size": img_size} if "vit" in model or "deit" in model else {}
    with torch.device("meta"):
        net = timm.create_model(model, num_classes=num_classes, in_chans=in_chans, **kwargs).eval()
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # the fused kernel is counted as 0 FLOPs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, in_chans, img_size, img_size, device="meta"))
    return counter.get_total_flops()


def mean_student_flops(space, samples: int = 2_000) -> tuple[float, float]:
    """The mean forward FLOPs of the space's students within its budget (uniform samples), and the default's."""
    rng = np.random.default_rng(0)
    flops = []
    for _ in range(samples):
        student = space.sample(rng).student
        if not student.problems() and space.budget.feasible(student):
            flops.append(count_flops(student).flops)
    return float(np.mean(flops)), float(count_flops(space.default_spec().student).flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--teacher-efficiency", type=float, default=0.30, help="share of peak a ViT-B reaches")
    ap.add_argument("--student-efficiency", type=float, default=0.10, help="share of peak a small student reaches")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--confirm-runs", type=int, default=15, help="confirm: members x seeds")
    args = ap.parse_args()
    space = load_space(args.space)
    d = space.data
    n_all = TRAIN_IMAGES[d.name]
    n_train, n_val = round(n_all * (1 - d.val_fraction)), round(n_all * d.val_fraction)
    info = DATASETS[d.name]
    teacher = teacher_forward_flops(space.teacher.model, d.num_classes or 10, info.in_chans, d.img_size)
    mean_s, default_s = mean_student_flops(space)
    epochs = space.default_spec().train.epochs
    t_rate = args.peak_tflops * 1e12 * args.teacher_efficiency
    s_rate = args.peak_tflops * 1e12 * args.student_efficiency
    steps = {
        "teacher finetune": (args.finetune_epochs * (3 * n_train + n_val) * teacher, t_rate),
        "teacher cache (once per search)": ((epochs if d.augment else 1) * n_train * teacher, t_rate),
        "one default trial": (epochs * (3 * n_train + n_val) * default_s, s_rate),
        f"search, {space.search.trials} trials, no early stop": (
            space.search.trials * epochs * (3 * n_train + n_val) * mean_s,
            s_rate,
        ),
        f"confirm, {args.confirm_runs} runs": (
            args.confirm_runs * epochs * (3 * n_train + n_val + TEST_IMAGES[d.name]) * mean_s,
            s_rate,
        ),
    }
    print(
        f"{space.name}: {d.name} at {d.img_size} px, {n_train:,} train / {n_val:,} val images, {epochs} epochs; "
        f"teacher {space.teacher.model} {teacher / 1e9:.2f} GFLOPs/image; students {mean_s / 1e9:.2f} GFLOPs mean "
        f"(default {default_s / 1e9:.2f}); peak {args.peak_tflops:g} TFLOP/s at {args.teacher_efficiency:.0%} (teacher) "
        f"and {args.student_efficiency:.0%} (students)"
    )
    print(f"{'step':<40} {'PFLOPs':>10} {'one GPU':>10}")
    for name, (flops, rate) in steps.items():
        seconds = flops / rate
        shown = f"{seconds / 60:.0f} min" if seconds < 5_400 else f"{seconds / 3600:.1f} h"
        print(f"{name:<40} {flops / 1e15:>10,.1f} {shown:>10}")
    assert math.isfinite(mean_s)


if __name__ == "__main__":
    main()
