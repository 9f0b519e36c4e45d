"""benchmarks/gpu_check.sh runs on a CPU for a few steps (the figures it exists for need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_check_runs_on_a_cpu_for_a_few_steps() -> None:
    args = ["--steps", "2", "--batch", "4", "--image-size", "32", "--no-compile", "--json"]
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    assert out["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    for name in ("student fp32", "student bf16"):
        assert out[name]["images_per_second"] > 0 and out[name]["gflops_per_image"] > 0
    assert out["teacher ViT-B/16 views per second"] > 0
    assert out["1 small trial images per second"] > 0 and out["4 small trials packed, total images per second"] > 0
    assert out["one-shot"]["supernet epoch images per second"] > 0 and out["one-shot"]["supernet epoch seconds"] > 0
    assert out["one-shot"]["screening students per second"] > 0


@pytest.mark.timeout(300)
def test_driver_scale_runs_both_drivers_on_a_few_noop_trials() -> None:
    """benchmarks/driver_scale.py at a tiny size: kdsearch's loop (run_search with noop_trial)
    and plain Ray Tune each run every trial, and each figure is measured."""
    args = ["--trials", "8", "--epochs", "1", "--json"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "driver_scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, kd = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (plain["driver"], kd["driver"]) == ("plain Tune", "kdsearch")
    for row in (plain, kd):
        assert row["trials"] == 8
        assert row["ms/trial, all"] > 0 and row["suggest median ms"] > 0 and row["peak RSS MiB"] > 100
    assert kd["trial rows"] == 8 and 0 < kd["epoch rows"] <= 8  # a feasible trial reports its one epoch
