"""Measured costs of a student at inference: latency, throughput and peak memory on a device.

The three measured objectives of `kdsearch.space.objectives` (`latency_ms`, `throughput`,
`inference_memory`) call `measure_objective` with a `MeasureContext` and the name;
`kdsearch measure` (kdsearch.results.measured) calls `measure_model` on the weights a run saved.
Every figure is taken on the model in eval mode, in float32, under `torch.inference_mode`,
on random images of the student's input shape (timing does not depend on pixel values):

    latency_ms        batch 1: the median wall time of a forward, in milliseconds
    throughput        batch BATCH: BATCH / the median wall time of a forward, images per second
    inference_memory  batch BATCH: the bytes of the weights plus the peak of the bytes allocated
                      while the input is made and one forward runs (CUDA: max_memory_allocated
                      after a reset, above what was allocated before; CPU: the running sum of
                      torch.profiler's allocation and free events, at its peak)

The warm-up and timed forwards on each kind of device, and BATCH, are stated in the objectives
table (MEASURE_REPEATS, MEASURE_BATCH). CUDA is synchronized before and after every timed forward. The architecture does not change
while a trial trains, so a trial measures each model once (at its first epoch) and reports the
same value after every later epoch (`measure_objective`).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdsearch.space.objectives import MEASURE_BATCH as BATCH
from kdsearch.space.objectives import MEASURE_REPEATS


def repeats(device: torch.device | str, what: str) -> tuple[int, int]:
    """(warm-up, timed) forwards for `what` ("latency" or "throughput") on `device`'s kind."""
    return MEASURE_REPEATS["cuda" if torch.device(device).type == "cuda" else "cpu"][what]


def median_seconds(fn: Callable[[], Any], reps: tuple[int, int], device: torch.device | None = None) -> float:
    """The median wall time of `fn()` over `reps[1]` calls after `reps[0]` untimed ones."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    warmup, timed = reps
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(timed):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _images(shape: tuple[int, int, int], batch: int, device: torch.device) -> torch.Tensor:
    """Seeded random images, made on the CPU with their own generator (the caller's RNG stays untouched)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=g).to(device)


def latency_ms(model: nn.Module, shape: tuple[int, int, int], device: torch.device | str) -> float:
    """Batch-1 latency in milliseconds (see the module docstring)."""
    device = torch.device(device)
    x = _images(shape, 1, device)
    with torch.inference_mode():
        return 1e3 * median_seconds(lambda: model(x), repeats(device, "latency"), device)


def throughput(model: nn.Module, shape: tuple[int, int, int], device: torch.device | str, batch: int = BATCH) -> float:
    """Images per second at `batch` images per forward."""
    device = torch.device(device)
    x = _images(shape, batch, device)
    with torch.inference_mode():
        return batch / median_seconds(lambda: model(x), repeats(device, "throughput"), device)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def inference_memory(
    model: nn.Module, shape: tuple[int, int, int], device: torch.device | str, batch: int = BATCH
) -> float:
    """The weights' bytes plus the peak bytes allocated while the input is made and one forward
    at `batch` runs (see the module docstring)."""
    device = torch.device(device)

    def forward() -> None:
        with torch.inference_mode():
            x = _images(shape, batch, device)
            y = model(x)
            del x, y

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = _cpu_peak_bytes(forward)
    return float(weight_bytes(model) + extra)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """The peak of the running sum of CPU allocations minus frees while `fn` runs, from
    torch.profiler's memory events (every tensor allocation and free, in the order they happened)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() in cpu]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


MEASURES: dict[str, Callable[[nn.Module, tuple[int, int, int], torch.device], float]] = {
    "latency_ms": latency_ms,
    "throughput": throughput,
    "inference_memory": inference_memory,
}


def measure_model(model: nn.Module, shape: tuple[int, int, int], device: torch.device | str) -> dict[str, float]:
    """All three figures of `model` (put in eval mode and on `device` here)."""
    device = torch.device(device)
    model = model.eval().to(device)
    return {name: float(f(model, shape, device)) for name, f in MEASURES.items()}


def device_name(device: torch.device | str) -> str:
    """The GPU's model, or the CPU's (from /proc/cpuinfo where there is one) with the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- the objectives' functions

_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()


def measure_objective(ctx: Any, name: str) -> float:
    """`name` measured on `ctx.model` at the first epoch it is asked for, then the same value:
    training changes the weights, never the architecture (the cache dies with the model)."""
    device = torch.device(ctx.device)
    values = _MEASURED.setdefault(ctx.model, {})
    key = (name, str(device))
    if key not in values:
        s = ctx.spec.student
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            values[key] = float(MEASURES[name](ctx.model, (s.in_chans, s.img_size, s.img_size), device))
        finally:
            ctx.model.train(was_training)
    return values[key]


# ---------------------------------------------------------------- an exported ONNX graph


def onnx_figures(path: str, shape: tuple[int, int, int]) -> dict[str, float | None]:
    """latency_ms and throughput of an ONNX graph (input `images`, output `logits`) run by
    onnxruntime on the CPU with as many threads as torch uses, timed as the PyTorch model is;
    inference_memory is None (onnxruntime's arena is not measured)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    cpu = torch.device("cpu")
    one, many = _images(shape, 1, cpu).numpy(), _images(shape, BATCH, cpu).numpy()
    latency = median_seconds(lambda: session.run(["logits"], {"images": one}), repeats(cpu, "latency"))
    per_batch = median_seconds(lambda: session.run(["logits"], {"images": many}), repeats(cpu, "throughput"))
    return {"latency_ms": 1e3 * latency, "throughput": BATCH / per_batch, "inference_memory": None}
