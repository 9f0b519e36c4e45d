"""`kdsearch export --img-size N` on the shared small real run (16 px digits): the student carried
to N zero-shot, or the study's fine-tuned weights at N when study.parquet holds them; FLOPs,
ONNX graph and accuracies at N; a bad N is one line."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnxruntime as ort
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save

import kdsearch
from kdsearch.errors import KdsearchError
from kdsearch.models.resolution import carried_student
from kdsearch.models.student import build_student
from kdsearch.results.export import read_card, spec_of
from kdsearch.results.export_resolution import carried_row, carry_export
from kdsearch.results.tables import STUDY_COLUMNS, RunPaths, write_table
from kdsearch.space.specs import DataSpec
from kdsearch.storage import Storage
from kdsearch.train.data import load_data
from kdsearch.train.evaluation import evaluate
from tests.helpers import run_cli
from tests.helpers import run_dir as local_run_dir

PX = 24  # the run is searched at 16 px with patches of 4 and 2


@pytest.fixture(scope="module")
def run_dir(small_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared run, so a study.parquet written here reaches no other test."""
    return Path(shutil.copytree(local_run_dir(small_run[0]), tmp_path_factory.mktemp("run") / "run"))


@pytest.fixture(scope="module")
def best(run_dir: Path) -> dict:
    trials = pd.read_parquet(run_dir / "trials.parquet")
    return trials[trials.status == "completed"].sort_values("val_acc").iloc[-1].to_dict()


def digits_at(px: int) -> torch.Tensor:
    return next(iter(load_data(DataSpec(img_size=px)).val_batches(16)))[0]


def test_export_carries_the_student_zero_shot(
    run_dir: Path, best: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student"
    assert run_cli(["export", str(run_dir), "--trial", best["trial_id"], "--out", str(out), "--img-size", str(PX)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    how = f"carried from 16 px to {PX} px, zero-shot (no training at {PX} px)"
    assert f"exported trial {best['trial_id']}, {how} (val_acc" in said
    card = read_card(out)
    assert card["student"]["img_size"] == card["data"]["img_size"] == PX
    assert card["carried"] == {"from_img_size": 16, "img_size": PX, "pos_embed": best["student.pos_embed"]} | {
        "mode": "zero_shot",
        "how": how,
    }
    spec = spec_of(best)
    at = dataclasses.replace(spec.student, img_size=PX)
    assert card["cost"]["flops"] == kdsearch.count_flops(at).flops == card["metrics"]["flops"] != best["flops"]
    # the exported weights are the trial's own, carried: the same logits as carrying them here
    expected = carried_student(spec.student, load_file(run_dir / best["checkpoint"]), PX)
    model = kdsearch.load_student(out)
    x = digits_at(PX)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))
    assert card["metrics"]["val_acc"] == evaluate(expected, load_data(DataSpec(img_size=PX)))
    # the ONNX graph takes PX-pixel images and was checked on digits at PX
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, PX, PX]
    assert card["onnx"]["checked"]["of"] == "digits val images" and card["test"]["images"] == 360
    assert (
        f"| resolution | {how}; `{best['student.pos_embed']}` carried its usual way" in (out / "README.md").read_text()
    )
    # and `eval` measures it again at PX
    assert run_cli(["eval", str(out), "--json"]) == 0
    assert f'"val_acc": {card["metrics"]["val_acc"]}' in capsys.readouterr().out


def study_row(best: dict, **values: object) -> dict:
    row = {c: None for c in STUDY_COLUMNS}
    row.update(trial_id=best["trial_id"], pos_embed=best["student.pos_embed"], img_size=PX, trained_img_size=16)
    row.update(mode="finetuned", seed=1, status="completed", val_acc=0.5, finetune_epochs=2, flops=1.0, params=1.0)
    return {**row, **values}


def test_the_studys_best_finetuned_weights_are_exported(run_dir: Path, best: dict, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))  # its study.parquet reaches no other test
    at = dataclasses.replace(spec_of(best).student, img_size=PX)
    store = Storage.open(run_dir)
    weights = {}
    for seed in (5, 6, 7):
        torch.manual_seed(seed)  # stand-ins for fine-tuned students: each its own weights at PX
        weights[seed] = save(build_student(at).state_dict())
        store.write_bytes(f"study/{best['trial_id']}/px{PX}/seed{seed}.safetensors", weights[seed])
    rel = f"study/{best['trial_id']}/px{PX}/seed{{}}.safetensors".format
    rows = [
        study_row(best, seed=5, val_acc=0.7, weights=rel(5)),
        study_row(best, seed=6, val_acc=0.9, weights=rel(6)),  # the best completed one at PX
        study_row(best, seed=7, val_acc=0.95, weights=rel(7), status="failed"),
        study_row(best, seed=3, val_acc=0.99, mode="zero_shot", finetune_epochs=0),
        study_row(best, seed=8, val_acc=0.99, img_size=32, weights=rel(7)),
    ]
    write_table(rows, store, RunPaths.RESOLUTIONS, STUDY_COLUMNS)
    # export_student's carrying step (the rest of the export is the zero-shot test's: no second ONNX graph)
    paths, spec = RunPaths.at(run_dir), spec_of(best)
    trained = paths.store.read_bytes(best["checkpoint"])
    got, exported, carried = carry_export(spec, best, paths, trained, PX)
    assert got.student == at and got.data.img_size == PX and exported == weights[6]
    how = f"carried from 16 px to {PX} px, fine-tuned 2 epochs (seed 6)"
    assert carried == {
        "from_img_size": 16,
        "img_size": PX,
        "pos_embed": best["student.pos_embed"],
        "mode": "finetuned",
        "finetune_epochs": 2,
        "seed": 6,
        "weights": rel(6),
        "study_val_acc": 0.9,
        "how": how,
    }
    assert carried_row({"carried": carried}).startswith(f"| resolution | {how}; ")
    # at the trained 16 px: nothing to carry, unless the study fine-tuned it there
    assert carry_export(spec, best, paths, trained, 16) == (spec, trained, None)
    at16 = f"study/{best['trial_id']}/px16/seed16.safetensors"
    store.write_bytes(at16, trained)
    write_table(
        [*rows, study_row(best, img_size=16, seed=16, weights=at16)], store, RunPaths.RESOLUTIONS, STUDY_COLUMNS
    )
    assert (
        carry_export(spec, best, paths, trained, 16)[2]["how"] == "at its trained 16 px, fine-tuned 2 epochs (seed 16)"
    )
    # no fine-tuned row at 12 px: the trial's own weights carried there
    assert carry_export(spec, best, paths, trained, 12)[2]["mode"] == "zero_shot"
    # the study's file gone: one line, not the zero-shot weights in its place
    (run_dir / rel(6)).unlink()
    with pytest.raises(KdsearchError, match=r"seed6\.safetensors is missing: the study's fine-tuned weights of trial"):
        carry_export(spec, best, paths, trained, PX)


@pytest.mark.parametrize("px", ["17", "0", "-8"])  # off the grid of patch 4 and of patch 2, or too small
def test_a_bad_img_size_is_one_line(
    run_dir: Path, best: dict, tmp_path: Path, px: str, capsys: pytest.CaptureFixture[str]
) -> None:
    patch = best["student.patch_size"]
    out = tmp_path / "x"
    assert run_cli(["export", str(run_dir), "--trial", best["trial_id"], "--out", str(out), "--img-size", px]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--img-size {px}: must be a multiple of the student's patch size {patch}" in err
    assert not out.exists()
