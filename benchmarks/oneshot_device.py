"""The one-shot strategy's steps on a device (benchmarks/gpu_check.py runs this): one supernet
epoch of digits_quick (training images per second through the sandwich's students), and the
screening's scoring with inherited weights (students per second), on the device against one
CPU thread in the same run (the baseline: what a CPU scoring task does)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdsearch.models.sandwich import random_student
from kdsearch.space.file import load_space
from kdsearch.train.data import load_data
from kdsearch.train.setup import TrialSetup
from kdsearch.train.supernet_training import score_subnets, train_supernet
from kdsearch.train.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]


def scoring_rate(net: torch.nn.Module, students: list, data: object, device: torch.device) -> float:
    """Students scored per second on `device` (after one warm-up student)."""
    net = net.to(device)
    score_subnets(net, students[:1], data, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    score_subnets(net, students, data, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(students) / (time.perf_counter() - t0)


def device_figures(device: torch.device, students: int = 200) -> dict[str, float]:
    """One supernet epoch and the scoring of `students` random students, on `device`; the
    scoring again on one CPU thread (at most 40 students there)."""
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    load_teacher(space, train_if_missing=True)  # the built-in teacher, trained once where the space points
    data = load_data(space)
    reports: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        net = train_supernet(space, TrialSetup(workdir=Path(tmp), data=data, device=device), 1, reports.append)
    rng = np.random.default_rng(0)
    chosen = [random_student(space, rng, within_budget=True) for _ in range(students)]
    on_device = scoring_rate(net, chosen, data, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        on_cpu = scoring_rate(net, chosen[:40], data, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return {
        "supernet epoch seconds": float(reports[-1]["seconds"]),
        "supernet epoch images per second": float(reports[-1]["images_per_s"]),
        "screening students per second": on_device,
        "screening students per second, 1 CPU thread": on_cpu,
    }
