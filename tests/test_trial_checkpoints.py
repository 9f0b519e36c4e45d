"""Checkpoints during a trial: run_trial continues exactly from one (no Ray), a search's trial
that dies mid-way continues from its last one, and an early-stopped trial keeps its weights."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdsearch.space import objectives
from kdsearch.space.objectives import Objective
from kdsearch.space.specs import TrainSpec
from kdsearch.train.data import load_data
from kdsearch.train.teacher import load_teacher
from kdsearch.train.trial import TRAINING_STATE, run_trial
from tests.helpers import run_cli, run_dir, write_space


class Interrupted(Exception):
    pass


@pytest.fixture()
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other processes (10x slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_a_trial_continued_from_its_checkpoint_ends_as_an_uninterrupted_one(
    digits_space, tmp_path: Path, one_thread
) -> None:
    """Feature distillation (the loss holds a trained projector) with a live teacher, 3 epochs:
    stopped after epoch 2's checkpoint and continued, it reports epoch 3 only and ends with
    the very weights of a run that never stopped."""
    data = load_data(digits_space)
    teacher = load_teacher(digits_space, data=data)
    spec = digits_space.default_spec({"recipe.alpha": 0.5, "recipe.feature_weight": 1.0})
    spec = replace(spec, train=TrainSpec(epochs=3, batch_size=64, lr=2e-3, warmup_epochs=1))
    whole: list[dict] = []
    run_trial(spec, whole.append, tmp_path / "whole", data=data, teacher=teacher, device="cpu")

    saved = tmp_path / "saved"
    first: list[dict] = []

    def report(metrics: dict, checkpoint: Path | None = None) -> None:
        first.append(metrics)
        if checkpoint is not None:
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(checkpoint, saved)  # what Ray Tune does with it
        if metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_trial(spec, report, tmp_path / "first", data=data, teacher=teacher, device="cpu", checkpoint_every=1)
    assert sorted(p.name for p in saved.iterdir()) == sorted(["model.safetensors", "trial_spec.json", TRAINING_STATE])
    assert torch.load(saved / TRAINING_STATE, weights_only=True)["epoch"] == 2

    rest: list[dict] = []
    run_trial(spec, rest.append, tmp_path / "rest", data=data, teacher=teacher, device="cpu", resume_from=saved)
    assert [r["epoch"] for r in first] == [1, 2] and [r["epoch"] for r in rest] == [3]
    assert rest[0]["train_loss"] == whole[2]["train_loss"] and rest[0]["lr"] == whole[2]["lr"]
    a, b = (
        load_file(str(tmp_path / "whole" / "model.safetensors")),
        load_file(str(tmp_path / "rest" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the first two epochs' checkpoint is not the final student: the test can tell them apart
    c = load_file(str(saved / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)

    other = digits_space.default_spec({"recipe.alpha": 0.0})
    with pytest.raises(ValueError, match="another trial spec"):
        run_trial(other, rest.append, tmp_path / "other", data=data, resume_from=saved)
