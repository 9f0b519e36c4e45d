"""run_trial: the cache, the live teacher, determinism, divergence, saved weights, and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from kdsearch.models.student import build_student
from kdsearch.space.specs import RecipeSpec, TrainSpec, TrialSpec
from kdsearch.train.data import load_data
from kdsearch.train.evaluation import evaluate
from kdsearch.train.logit_cache import teacher_logits
from kdsearch.train.loop import TrialDiverged
from kdsearch.train.setup import TrialSetup
from kdsearch.train.teacher import load_teacher, run_teacher
from kdsearch.train.trial import run_trial
from tests.helpers import run_cli

METRICS = {
    "epoch",
    "val_acc",
    "train_loss",
    "flops",
    "macs",
    "params",
    "epoch_seconds",
    "images_per_second",
    "teacher_images",
}


@pytest.fixture(scope="module")
def data(digits_space):
    return load_data(digits_space)


@pytest.fixture(scope="module")
def teacher(digits_space, data):
    return load_teacher(digits_space, data=data)


def test_cached_and_live_teacher_give_the_same_loss(digits_space, data, teacher, tmp_path: Path) -> None:
    """With lr 0 the student never moves, so an epoch's mean loss compares the two paths batch by batch."""
    spec = digits_space.default_spec({"recipe.alpha": 0.8})
    spec = replace(spec, train=TrainSpec(epochs=1, lr=0.0, warmup_epochs=0))
    cached, live = [], []
    setup = TrialSetup(workdir=tmp_path / "a", data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    run_trial(spec, setup, cached.append)
    # a second cached trial finds the cache: no image goes through the teacher
    again = []
    run_trial(spec, replace(setup, workdir=tmp_path / "b"), again.append)
    run_trial(spec, replace(setup, workdir=tmp_path / "c", cache_dir=None, live_teacher=True), live.append)
    assert cached[0]["teacher_images"] == data.num_train  # this trial computed the cache
    assert again[0]["teacher_images"] == 0
    assert live[0]["teacher_images"] == data.num_train // 64 * 64  # every training batch, live
    assert again[0]["train_loss"] == pytest.approx(live[0]["train_loss"], rel=1e-5)
    assert again[0]["loss_soft"] == pytest.approx(live[0]["loss_soft"], rel=1e-5)
    assert again[0]["loss_soft"] > 0.01


def test_first_batch_loss_is_identical(digits_space, data, teacher, tmp_path: Path) -> None:
    logits, _ = teacher_logits(teacher, data, digits_space.teacher, tmp_path)
    x, _, idx = next(data.train_batches(64, 0, 0))
    torch.testing.assert_close(logits.take(idx), run_teacher(teacher, x).logits, rtol=1e-5, atol=1e-5)


def test_reports_every_epoch_and_saves_weights(digits_space, data, teacher, tmp_path: Path) -> None:
    spec = digits_space.default_spec({"student.distill_token": True, "student.pos_embed": "rope"})
    reports: list[dict] = []
    setup = TrialSetup(workdir=tmp_path, data=data, teacher=teacher, cache_dir=tmp_path / "cache")
    result = run_trial(spec, setup, reports.append)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert METRICS <= set(reports[-1])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where run_trial trained
    for r in reports:  # throughput, measured: device memory (and MFU, where the GPU's peak is known) on a GPU only
        assert r["images_per_second"] > 0 and 0 < r["data_wait_share"] < 1
        if device.type == "cuda":
            assert r["peak_memory"] > 0 and not r["mfu"] <= 0
        else:
            assert math.isnan(r["peak_memory"]) and math.isnan(r["mfu"])
    assert result["checkpoint"] == str(tmp_path / "model.safetensors")
    saved = TrialSpec.from_dict(json.loads((tmp_path / "trial_spec.json").read_text()))
    assert saved == spec
    model = build_student(saved.student)
    model.load_state_dict(load_file(result["checkpoint"]))
    assert evaluate(model.to(device), data, device) == reports[-1]["val_acc"]


def test_deterministic_for_a_seed(digits_space, data, teacher, tmp_path: Path) -> None:
    spec = digits_space.default_spec({"student.pos_embed": "relpos"})
    a, b, c = [], [], []
    run_trial(spec, TrialSetup(workdir=tmp_path / "a", data=data, teacher=teacher, cache_dir=tmp_path), a.append)
    run_trial(spec, TrialSetup(workdir=tmp_path / "b", data=data, teacher=teacher, cache_dir=tmp_path), b.append)
    other = replace(spec, train=TrainSpec(**{**spec.train.__dict__, "seed": 1}))
    run_trial(other, TrialSetup(workdir=tmp_path / "c", data=data, teacher=teacher, cache_dir=tmp_path), c.append)
    assert [(r["train_loss"], r["val_acc"]) for r in a] == [(r["train_loss"], r["val_acc"]) for r in b]
    assert a[-1]["train_loss"] != c[-1]["train_loss"]


def test_divergence_raises_with_the_epoch(digits_space, data, teacher, tmp_path: Path) -> None:
    spec = replace(digits_space.default_spec(), train=TrainSpec(epochs=3, lr=1e6, warmup_epochs=0))
    reports: list[dict] = []
    with pytest.raises(TrialDiverged) as info:
        run_trial(spec, TrialSetup(workdir=tmp_path, data=data, teacher=teacher, cache_dir=tmp_path), reports.append)
    assert info.value.epoch == 1 and not math.isfinite(info.value.loss)
    assert reports == []


def test_no_teacher_needed_without_distillation(digits_space, data, tmp_path: Path) -> None:
    spec = digits_space.default_spec({"recipe.alpha": 0.0})
    reports: list[dict] = []
    run_trial(spec, TrialSetup(workdir=tmp_path, data=data, teacher=None), reports.append)
    assert reports[-1]["teacher_images"] == 0 and "loss_soft" not in reports[-1]


def test_feature_distillation_from_the_cnn_runs_live(digits_space, data, teacher, tmp_path: Path) -> None:
    spec = replace(digits_space.default_spec(), recipe=RecipeSpec(alpha=0.5, feature_weight=1.0))
    reports: list[dict] = []
    run_trial(spec, TrialSetup(workdir=tmp_path, data=data, teacher=teacher), reports.append)
    assert reports[0]["teacher_images"] > 0 and reports[-1]["loss_feature"] > 0


def test_attention_distillation_from_a_timm_vit(digits_space, data, tmp_path: Path) -> None:
    vit = timm.models.VisionTransformer(
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2
    ).eval()
    out = run_teacher(vit, next(data.train_batches(8, 0, 0))[0], features=True, attn=True)
    assert out.attn.shape == (8, 2, 65, 65) and out.features.shape == (8, 64, 32) and out.num_prefix_tokens == 1
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(8, 2, 65))
    spec = replace(
        digits_space.default_spec({"student.distill_token": True}),
        recipe=RecipeSpec(alpha=0.5, attention_weight=1.0, feature_weight=0.5),
    )
    reports: list[dict] = []
    run_trial(spec, TrialSetup(workdir=tmp_path, data=data, teacher=vit), reports.append)
    assert reports[-1]["loss_attention"] > 0 and reports[-1]["loss_feature"] > 0


# ---- the CLI --------------------------------------------------------------------------


def test_cli_trial_json(
    digits_space_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the logit cache goes to ./runs/NAME/cache
    code = run_cli(
        [
            "trial",
            str(digits_space_file),
            "--set",
            "student.depth=1",
            "--set",
            "train.epochs=1",
            "--json",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epoch"] == 1 and METRICS <= set(result) and Path(result["checkpoint"]).is_file()
    assert list((tmp_path / "runs" / "digits_search" / "cache").glob("teacher-logits-*.values.npy"))


def _space(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(body + "\nstudent: {embed_dim: 32, depth: 1}\ntrain: {epochs: 1}\n")
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("data: {name: cifar10, root: nowhere}\nteacher: {model: resnet18, checkpoint: r.pt}", "data.root: "),
        (
            "teacher: {model: resnet_nope_42, checkpoint: t.safetensors}",
            "teacher.model: 'resnet_nope_42' is not a timm model",
        ),
        ("teacher: {model: resnet10t, checkpoint: garbage.safetensors}", "teacher.checkpoint: cannot read"),
        ("teacher: {model: resnet10t, checkpoint: garbage.pt}", "teacher.checkpoint: cannot read"),
        ("teacher: {model: resnet10t, checkpoint: missing.pt}", "does not exist"),
    ],
)
def test_cli_trial_bad_inputs_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a pickle")
    assert run_cli(["trial", str(_space(tmp_path, body)), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_cli_trial_bad_set(digits_space_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["trial", str(digits_space_file), "--set", "student.depth"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert run_cli(["trial", str(digits_space_file), "--set", "student.num_heads=3"]) == 2
    assert "not divisible by num_heads 3" in capsys.readouterr().err
