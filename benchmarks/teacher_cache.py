"""What the replay cache saves: a distillation trial under random augmentation with the replay
cache, with the teacher run live, and plain cross-entropy (no teacher), in the same run.

An image-folder set is generated at run time (coloured shapes, 10 classes, 32px) and read
with random crops and flips; the teacher is a timm ViT built to cost about 20x the student's
FLOPs (both counted here, attention included), with random weights (timing does not depend on
what it learned). Goal (issue 10): cache / CE <= 1.05 (the cache makes distillation cost what
plain training costs), live / cache shown; plus the cache's build time and its bytes per image
per epoch, measured from its files.

    .venv/bin/python benchmarks/teacher_cache.py [--epochs 3] [--images 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_image_folder(root: Path, classes: int, per_class: int, size: int = 32) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (classes, 3))  # a class is its colour, in both splits
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = colours[c]
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                x0, y0 = rng.integers(0, size // 2, 2)
                img[y0 : y0 + size // 2, x0 : x0 + size // 2] = colour
                Image.fromarray(img).save(folder / f"{i:04d}.png")


def register_teacher() -> str:
    """A timm ViT for 32px images (patch 4, width 192, depth 7), registered under a timm name
    so kdsearch loads it as it loads any timm teacher."""
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    name = "kdbench_vit_32"

    @register_model
    def kdbench_vit_32(pretrained: bool = False, **kwargs):  # noqa: ARG001 - timm's signature
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        return VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=7, num_heads=3, **kwargs)

    return name


def teacher_flops(model: torch.nn.Module, img_size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # FlopCounterMode counts fused attention as 0 on CPU
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=100, help="training images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="each trial runs this many times; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm
    from safetensors.torch import save_file

    from kdsearch.space.flops import count_flops
    from kdsearch.space.specs import DataSpec, RecipeSpec, StudentSpec, TeacherSpec, TrainSpec, TrialSpec
    from kdsearch.storage import Storage
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import cache_key
    from kdsearch.train.replay_cache import ReplayCache, build_replay_cache
    from kdsearch.train.trial import TrialSetup, run_trial

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_image_folder(tmp / "data", 10, args.images)
        name = register_teacher()
        teacher_net = timm.create_model(name, pretrained=False, num_classes=10)
        save_file(teacher_net.state_dict(), str(tmp / "teacher.safetensors"))
        data_spec = DataSpec(name="imagefolder", img_size=32, root=str(tmp / "data"), num_classes=10, augment=True)
        student = StudentSpec(img_size=32, in_chans=3, num_classes=10, patch_size=4, embed_dim=64, depth=4, num_heads=4)
        spec = TrialSpec(
            student=student,
            recipe=RecipeSpec(alpha=0.8, temperature=4.0),
            train=TrainSpec(epochs=args.epochs, batch_size=64, lr=2e-3, warmup_epochs=1),
            data=data_spec,
            teacher=TeacherSpec(model=name, checkpoint=str(tmp / "teacher.safetensors")),
        )
        t_flops, s_flops = teacher_flops(teacher_net, 32), count_flops(student).flops
        data = load_data(data_spec)

        from kdsearch.train.teacher import load_teacher

        teacher = load_teacher(spec)
        key = cache_key(spec.teacher, data)
        cache = ReplayCache(Storage.open(tmp / "cache"), key, data.num_classes, spec.teacher.cache_topk)
        t0 = time.perf_counter()
        views = build_replay_cache(teacher, data, cache, args.epochs)
        build_seconds = time.perf_counter() - t0
        cache_bytes = sum(p.stat().st_size for p in (tmp / "cache").rglob("*.npz"))

        def timed(name: str, trial_spec: TrialSpec, **kw) -> tuple[str, float, dict]:
            best, result = float("inf"), {}
            for _ in range(args.repeats):  # the fastest of a few: the first run pays one-time warm-ups
                t = time.perf_counter()
                result = run_trial(trial_spec, TrialSetup(workdir=tmp / name, data=data, **kw), lambda m: None)
                best = min(best, time.perf_counter() - t)
            return name, best, result

        rows = [
            timed("replay cache", spec, teacher=teacher, cached_logits=cache),
            timed("live teacher", spec, teacher=teacher, live_teacher=True),
            timed("plain CE (no teacher)", dataclasses.replace(spec, recipe=RecipeSpec(alpha=0.0))),
        ]

    print(f"machine: {args.threads} CPU threads, torch {torch.__version__}, {torch.cuda.device_count()} GPUs")
    print(f"data: {data.num_train} training images x {args.epochs} epochs, random crop + flip at 32px")
    print(
        f"student: {s_flops / 1e6:.2f} MFLOPs/image; teacher (timm ViT, depth 7): {t_flops / 1e6:.2f} MFLOPs/image "
        f"= {t_flops / s_flops:.1f}x the student (FlopCounterMode, attention on the explicit path)"
    )
    print(
        f"replay cache build: {views:,} views in {build_seconds:.2f} s; {cache_bytes:,} bytes on disk = "
        f"{cache_bytes / views:.1f} bytes per image per epoch (4-byte seed + 10 fp16 logits, npz headers)"
    )
    print(f"{'trial':26s} {'wall s':>8s} {'teacher images':>15s} {'val_acc':>8s}")
    for name, seconds, result in rows:
        print(f"{name:26s} {seconds:8.2f} {result['teacher_images']:15,d} {result['val_acc']:8.4f}")
    cache_s, live_s, ce_s = (r[1] for r in rows)
    print(f"cache / CE = {cache_s / ce_s:.3f} (goal <= 1.05); live / cache = {live_s / cache_s:.2f}")


if __name__ == "__main__":
    main()
