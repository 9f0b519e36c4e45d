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
from kdsearch.train.checkpoint import STUDENT_FILES, TRAINING_STATE
from kdsearch.train.data import load_data
from kdsearch.train.setup import TrialSetup
from kdsearch.train.teacher import load_teacher
from kdsearch.train.trial import run_trial
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
    setup = TrialSetup(workdir=tmp_path / "whole", data=data, teacher=teacher, device="cpu")
    run_trial(spec, setup, whole.append)

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
        run_trial(spec, replace(setup, workdir=tmp_path / "first", checkpoint_every=1), report)
    assert sorted(p.name for p in saved.iterdir()) == sorted([*STUDENT_FILES, TRAINING_STATE])
    assert torch.load(saved / TRAINING_STATE, weights_only=True)["epoch"] == 2

    rest: list[dict] = []
    run_trial(spec, replace(setup, workdir=tmp_path / "rest", resume_from=saved), rest.append)
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
        run_trial(other, TrialSetup(workdir=tmp_path / "other", data=data, resume_from=saved), rest.append)


# --------------------------------------------------------------------------- in a search


@pytest.fixture()
def dies_once(tmp_path: Path):
    """A measured objective that logs (process, epoch) after every epoch of a trial, and kills
    its worker hard (os._exit: no exception, no cleanup) at epoch 3 of the first attempt."""
    log, marker = tmp_path / "epochs.log", tmp_path / "died"

    def measure(ctx: objectives.MeasureContext) -> float:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {ctx.epoch}\n")
        if ctx.epoch == 3 and not marker.exists():
            marker.touch()
            os._exit(1)
        return 0.0

    yield objectives.register(Objective("dies_once", "min", "", "dies at epoch 3 once", measure=measure)), log
    del objectives.OBJECTIVES["dies_once"]


@pytest.mark.timeout(400)
def test_a_retried_trial_continues_from_its_checkpoint(dies_once, digits_teacher_path: Path, tmp_path: Path) -> None:
    from kdsearch.search.run import run_search

    _, log = dies_once
    space_file = write_space(tmp_path, digits_teacher_path, trials=1, epochs=4, max_concurrent=1)
    raw = yaml.safe_load(space_file.read_text())
    raw["objectives"] = {"val_acc": "max", "flops": "min", "dies_once": "min"}
    raw["student"] = {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 4}
    raw["search"]["max_failures"] = 1
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = run_search(space_file, storage=tmp_path / "runs", say=lambda s: None)
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    assert len(trials) == 1 and trials.status[0] == "completed", trials[["status", "error"]]
    assert trials.retries[0] == 1 and trials.checkpoint_epoch[0] == 4
    assert epochs.epoch.tolist() == [1, 2, 3, 4]
    # what the trial itself ran: epochs 1-3 in the first worker (dead during 3), then 3-4 in the second
    runs = [line.split() for line in log.read_text().splitlines()]
    pids = list(dict.fromkeys(pid for pid, _ in runs))
    assert len(pids) == 2
    assert [int(e) for pid, e in runs if pid == pids[0]] == [1, 2, 3]
    assert [int(e) for pid, e in runs if pid == pids[1]] == [3, 4]
    # Tune keeps a trial's latest two checkpoints in the run's storage (of its 4 epochs: 3 and 4)
    kept = sorted((run_dir(result) / "tune").glob("*/checkpoint_*"))
    assert len(kept) == 2 and all((k / TRAINING_STATE).is_file() for k in kept)


def test_an_early_stopped_trial_keeps_its_last_weights(small_run, tmp_path: Path, capsys) -> None:
    """Exported by --trial, a stopped trial's student measures the accuracy it was stopped with."""
    import json

    result, _ = small_run
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    stopped = trials[trials.status == "stopped_early"]
    assert len(stopped)
    row = stopped.iloc[0]
    assert row.checkpoint_epoch == row.epochs < row.epochs_total
    run = str(run_dir(result))
    assert run_cli(["export", run, "--trial", row.trial_id, "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert run_cli(["eval", str(tmp_path / "s"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["val_acc"] == pytest.approx(row.val_acc, abs=1e-9) == measured["recorded_val_acc"]
    failed_or_infeasible = trials[trials.status == "infeasible"].trial_id.iloc[0]
    assert run_cli(["export", run, "--trial", failed_or_infeasible, "--out", str(tmp_path / "x")]) == 2


def test_the_study_is_live_for_optuna_dashboard(small_run) -> None:
    import optuna

    result, space = small_run
    trials = pd.read_parquet(run_dir(result) / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run_dir(result) / 'study.db'}")
    assert study.metric_names == ["val_acc", "flops"]
    by_number = {t.number: t for t in study.trials}
    for tid, row in trials.iterrows():
        ot = by_number[row.optuna_trial]
        assert ot.user_attrs["ray_trial_id"] == tid and ot.user_attrs["status"] == row.status
        curve = epochs[epochs.trial_id == tid].set_index("epoch").val_acc.to_dict()
        assert ot.intermediate_values == curve  # empty for an infeasible trial: it never trained
    assert any(t.intermediate_values for t in study.trials)
