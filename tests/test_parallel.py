"""A data-parallel trial: two processes (gloo on the CPU, NCCL on two GPUs) follow the
one-process curve on the same global batch, and save the same student; with one GPU, two
ranks are refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdsearch.errors import KdsearchError
from kdsearch.train.data import load_data
from kdsearch.train.setup import TrialSetup
from kdsearch.train.teacher import load_teacher
from kdsearch.train.trial import run_trial

TOLERANCE = 1e-3  # relative: the two processes sum each batch's loss in two halves, in float32


@pytest.mark.timeout(300)
def test_two_processes_follow_the_one_process_curve(digits_space, tmp_path: Path) -> None:
    data, teacher = load_data(digits_space), load_teacher(digits_space)
    spec = digits_space.default_spec()
    one: list[dict] = []
    two: list[dict] = []
    setup = TrialSetup(workdir=tmp_path / "one", data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    run_trial(spec, setup, one.append)
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:  # CUDA ranks need a GPU each
        with pytest.raises(KdsearchError, match=f"over 2 GPUs sees {torch.cuda.device_count()}"):
            run_trial(spec, replace(setup, workdir=tmp_path / "two", world_size=2), two.append)
        return
    run_trial(spec, replace(setup, workdir=tmp_path / "two", world_size=2), two.append)
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == list(range(1, spec.train.epochs + 1))
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=TOLERANCE)
        assert b["loss_soft"] == pytest.approx(a["loss_soft"], rel=TOLERANCE)
        assert b["images_per_second"] > 0 and b["teacher_images"] == 0
    w1, w2 = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3


def test_a_global_batch_must_split_evenly(digits_space, tmp_path: Path) -> None:
    spec = digits_space.default_spec()
    spec = replace(spec, train=replace(spec.train, batch_size=63))
    with pytest.raises(KdsearchError, match="train.batch_size 63 must divide evenly over 2 processes"):
        run_trial(spec, TrialSetup(workdir=tmp_path, world_size=2), lambda m: None)
