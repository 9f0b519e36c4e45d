"""GPU figures for kdsearch, in one run (benchmarks/gpu_check.sh runs this):

1. a DeiT-Tiny-sized student (224px, patch 16, width 192, depth 12) trained on synthetic data,
   fp32 against bf16 autocast against bf16 + torch.compile: images/s, MFU, peak memory;
2. the replay cache's teacher pass for a timm ViT-B/16 teacher on synthetic data: views/s;
3. four small trials packed on one GPU against one alone: total images/s;
4. the training data path there (benchmarks/data_path.py): in-memory CIFAR-shaped views made
   batched on the device (32 px kept, 32 to 224 px), and JPEGs decoded by nvJPEG: images/s;
5. the one-shot strategy there (benchmarks/oneshot_device.py): one supernet epoch of
   digits_quick (images/s), and the screening's scoring (students/s) against one CPU thread.

On a CPU it runs the same code for a few steps (how the test suite checks it); MFU and
memory are then not measured. Every figure printed is measured here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(
    image_size: int,
    steps: int,
    batch: int,
    device: torch.device,
    precision: str,
    compile_model: bool,
    small: bool = False,
) -> dict:
    """Images/s of the student's training step (after a warm-up), its MFU and peak memory."""
    from kdsearch.models.student import build_student
    from kdsearch.space.flops import count_flops
    from kdsearch.space.specs import RecipeSpec, StudentSpec, TrainSpec
    from kdsearch.train.distill import DistillLoss
    from kdsearch.train.loop import DistillStep, device_peak_flops, make_optimizer

    if small:
        spec = StudentSpec(img_size=32, in_chans=3, num_classes=100, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    else:
        spec = StudentSpec(
            img_size=image_size,
            in_chans=3,
            num_classes=1000,
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            mlp_ratio=4.0,
        )
    model = build_student(spec).to(device)
    step_fn: torch.nn.Module = DistillStep(model, DistillLoss(RecipeSpec(alpha=0.0)).to(device))
    optimizer, _ = make_optimizer([step_fn], TrainSpec(lr=1e-3), 1)
    if compile_model:
        step_fn = torch.compile(step_fn)
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=device)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    warmup = max(1, steps // 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast:
            total, _ = step_fn(x, y, None)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    _sync(device)
    ips = steps * batch / (time.perf_counter() - t0)
    flops = count_flops(spec).flops
    return {
        "images_per_second": ips,
        "mfu": 3 * flops * ips / device_peak_flops(device),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "gflops_per_image": flops / 1e9,
    }


def teacher_speed(image_size: int, batches: int, batch: int, device: torch.device) -> float:
    """Views/s of a timm ViT-B/16 teacher's forward pass (what building the replay cache costs)."""
    import timm

    teacher = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000, img_size=image_size)
    teacher = teacher.eval().to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        teacher(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            teacher(x)
        _sync(device)
    return batches * batch / (time.perf_counter() - t0)


def _packed(queue, steps: int, batch: int, device: str) -> None:
    queue.put(train_speed(32, steps, batch, torch.device(device), "bf16", False, small=True)["images_per_second"])


def packing(trials: int, steps: int, batch: int, device: torch.device) -> float:
    """Total images/s of `trials` small students training at once on one device."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_packed, args=(queue, steps, batch, str(device))) for _ in range(trials)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    runs = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("bf16", True)])
    for precision, compiled in runs:
        name = precision + (" + compile" if compiled else "")
        out[f"student {name}"] = train_speed(args.image_size, args.steps, args.batch, device, precision, compiled)
    out["teacher ViT-B/16 views per second"] = teacher_speed(
        args.image_size, max(2, args.steps // 10), args.batch, device
    )
    small_steps = max(2, args.steps)
    out["1 small trial images per second"] = packing(1, small_steps, args.batch, device)
    out["4 small trials packed, total images per second"] = packing(4, small_steps, args.batch, device)
    from data_path import device_figures  # benchmarks/data_path.py, beside this script

    out["data path"] = device_figures(device, args.steps * args.batch, args.batch)
    from oneshot_device import device_figures as oneshot_figures  # benchmarks/oneshot_device.py

    out["one-shot"] = oneshot_figures(device, students=min(200, 4 * args.steps))
    if args.json:
        print(json.dumps(out))
        return
    print(f"device: {out['device']}, torch {out['torch']}, {args.image_size}px, batch {args.batch}, {args.steps} steps")
    for key, value in out.items():
        if isinstance(value, dict) and key not in ("data path", "one-shot"):
            print(
                f"{key:28s} {value['images_per_second']:10.1f} images/s  MFU {value['mfu']:.1%}  "
                f"peak {value['peak_memory_gib']:.2f} GiB  ({value['gflops_per_image']:.2f} GFLOPs/image)"
            )
        elif isinstance(value, float):
            print(f"{key:48s} {value:10.1f}")
    for key, value in out["data path"].items():  # the training data path on the device (benchmarks/data_path.py)
        if isinstance(value, dict):
            print(f"data: {key:42s} {value['images_per_second']:10.1f} images/s  "
                  f"max |view - CPU decode's| {value['max_abs_diff_from_cpu_decode']:.3f}")  # fmt: skip
        elif isinstance(value, bool):
            print(f"data: {key:42s} {value}")
        elif "share" in key:
            print(f"data: {key:42s} {value:10.1%}")
        else:
            print(f"data: {key:42s} {value:10.1f} images/s")
    for key, value in out["one-shot"].items():
        print(f"one-shot: {key:42s} {value:10.1f}")


if __name__ == "__main__":
    main()
