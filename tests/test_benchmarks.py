"""benchmarks/gpu_check.sh runs on a CPU for a few steps (the figures it exists for need a GPU)."""

from __future__ import annotations

import json
import subprocess
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
    assert out["device"] == "cpu"
    for name in ("student fp32", "student bf16"):
        assert out[name]["images_per_second"] > 0 and out[name]["gflops_per_image"] > 0
    assert out["teacher ViT-B/16 views per second"] > 0
    assert out["1 small trial images per second"] > 0 and out["4 small trials packed, total images per second"] > 0
