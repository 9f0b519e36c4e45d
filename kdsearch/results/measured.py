"""`kdsearch measure`: the inference cost of a run's trained students on a device, from their saved weights.

Each measured trial (the front, or the trials asked for) is rebuilt from its checkpoint in
the run's storage and measured as a trial measures itself (kdsearch.train.measure): latency
at batch 1, throughput and peak memory at batch MEASURE_BATCH. `runtime="onnx"` times the
graph `kdsearch export` would write, run by onnxruntime on the CPU (the way it is deployed),
after checking its logits against PyTorch's.

The rows land in the run's measured.parquet, one per (trial, device, runtime): measuring
again replaces that row and keeps the others, so one table holds a CPU and a GPU column of
the same front.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdsearch.errors import KdsearchError
from kdsearch.results import selection
from kdsearch.results.export import check_images, check_onnx, select_trial, spec_of, student_from, trial_weights
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import Run, read_rows, require_finished, write_table
from kdsearch.space.objectives import MEASURE_BATCH

MEASURED = selection.MEASURED  # "measured.parquet": one name, kept beside the code that reads it to choose
MEASURED_COLUMNS = (
    "trial_id",
    "device",
    "runtime",
    "device_name",
    "batch",
    "latency_ms",
    "throughput",
    "inference_memory",
    "time",
)
FIGURES = ("latency_ms", "throughput", "inference_memory")
DEVICES = ("cpu", "cuda")
RUNTIMES = ("torch", "onnx")


def check_device(device: str, runtime: str = "torch") -> None:
    """One clear line for a device this machine lacks or a runtime that cannot use it."""
    import torch

    if device not in DEVICES:
        raise KdsearchError(f"--device {device}: allowed: {', '.join(DEVICES)}")
    if runtime not in RUNTIMES:
        raise KdsearchError(f"--runtime {runtime}: allowed: {', '.join(RUNTIMES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KdsearchError(
            "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu"
        )
    if runtime == "onnx" and device != "cpu":
        raise KdsearchError("--runtime onnx: times the graph with onnxruntime on the CPU; use --device cpu")


def trials_to_measure(
    run: Run, trial_ids: Sequence[str] = (), where: Sequence[str] = (), pick: str | None = None
) -> list[dict[str, Any]]:
    """The completed trials asked for (each checked as `export --trial` checks it), else the
    run's front; with `where` / `pick`, the front of the completed trials meeting the
    constraints, or its one picked member (kdsearch.results.selection). KdsearchError when
    --trial comes with them, or when no trial meets the constraints."""
    require_finished(run)
    if trial_ids and (where or pick):
        raise KdsearchError("measure: --trial names the trials; give it, or --where / --pick, not both")
    if trial_ids:
        return [select_trial(run.trials, run.objectives, trial_id=t) for t in dict.fromkeys(trial_ids)]
    if where or pick:
        rows = selection.restrict(run, where, pick)[1]
        if not rows:
            raise KdsearchError(selection.empty_line(f"measure {selection.given_text(where, pick)}", run.trials))
        return rows
    return front_rows(run.trials, run.objectives)


def measure_run(
    run: Run,
    device: str = "cpu",
    trial_ids: Sequence[str] = (),
    runtime: str = "torch",
    say: Callable[[str], None] = lambda s: None,
    where: Sequence[str] = (),
    pick: str | None = None,
) -> list[dict[str, Any]]:
    """Measure the trials (the front by default; `trials_to_measure`) on `device` with `runtime`;
    write their rows to the run's measured.parquet (replacing earlier rows of the same trial,
    device and runtime) and return them."""
    import torch

    from kdsearch.train.measure import device_name, measure_model, onnx_figures

    check_device(device, runtime)
    rows = []
    for row in trials_to_measure(run, trial_ids, where, pick):
        spec = spec_of(row)
        model = student_from(spec, trial_weights(row, run.paths))
        s = spec.student
        shape = (s.in_chans, s.img_size, s.img_size)
        say(f"measuring trial {row['trial_id']} on {device} ({runtime})")
        if runtime == "onnx":
            figures = _onnx(model, spec, shape, onnx_figures)
        else:
            figures = measure_model(model, shape, device)
        rows.append(
            {
                "trial_id": row["trial_id"],
                "device": device,
                "runtime": runtime,
                "device_name": device_name(torch.device(device)),
                "batch": MEASURE_BATCH,
                **figures,
                "time": time.time(),
            }
        )
    key = lambda r: (r["trial_id"], r["device"], r["runtime"])  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in read_rows(run.paths.store, MEASURED) if key(r) not in new]
    write_table(kept + rows, run.paths.store, MEASURED, MEASURED_COLUMNS)
    return rows


def _onnx(model: Any, spec: Any, shape: tuple[int, int, int], figures: Callable) -> dict[str, Any]:
    """The student exported as `kdsearch export` exports it, checked, then timed by onnxruntime."""
    from kdsearch.results.export import write_onnx

    with tempfile.TemporaryDirectory(prefix="kdsearch-measure-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_onnx(model, path)
        check_onnx(path, model, check_images(spec)[0])
        return figures(str(path), shape)
