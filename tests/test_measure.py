"""Measured objectives (latency_ms, throughput, inference_memory): a bigger student measures
costlier; a real search judged by (val_acc, latency_ms) records latency and fronts over it;
`kdsearch measure` measures a run's students from their weights into measured.parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kdsearch.models.student import build_student
from kdsearch.results.pareto import non_dominated_mask
from kdsearch.space import objectives
from kdsearch.space.objectives import MeasureContext
from kdsearch.space.specs import StudentSpec, TrialSpec
from kdsearch.train import measure
from tests.helpers import run_cli, run_dir, write_space

SMALL = StudentSpec(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
BIG = StudentSpec(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
SHAPE = (1, 32, 32)


@pytest.fixture()
def one_thread():
    """One thread: two on a shared two-core machine wait on each other, not on the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_bigger_student_measures_costlier(one_thread) -> None:
    torch.manual_seed(0)
    small, big = build_student(SMALL).eval(), build_student(BIG).eval()
    assert measure.latency_ms(big, SHAPE, "cpu") > 3 * measure.latency_ms(small, SHAPE, "cpu")  # ~40x the FLOPs
    assert measure.throughput(small, SHAPE, "cpu", batch=8) > 3 * measure.throughput(big, SHAPE, "cpu", batch=8)
    small_mem, big_mem = (measure.inference_memory(m, SHAPE, "cpu") for m in (small, big))
    assert big_mem > 3 * small_mem
    # a real peak: at least the weights and one block's MLP hidden activation at batch 64 (float32)
    mlp_hidden = measure.BATCH * (BIG.num_patches + 1) * BIG.mlp_hidden * 4
    assert big_mem >= measure.weight_bytes(big) + mlp_hidden
    assert small_mem < 64 * 2**20


def test_a_trial_measures_once_per_model(one_thread) -> None:
    spec = TrialSpec(student=StudentSpec(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    model = build_student(spec.student).eval()
    first = objectives.get("latency_ms").measure(
        MeasureContext(model, spec, None, torch.device("cpu"), 1, measure.measure_objective)
    )
    later = objectives.get("latency_ms").measure(
        MeasureContext(model, spec, None, torch.device("cpu"), 2, measure.measure_objective)
    )
    assert first == later > 0  # the same value, not a second timing (which would differ in its last digits)
    other = build_student(spec.student).eval()
    again = objectives.get("latency_ms").measure(
        MeasureContext(other, spec, None, torch.device("cpu"), 1, measure.measure_objective)
    )
    assert again > 0 and again != first
    # the objectives table says how, and kdsearch.train.measure takes it so
    assert "15 timed forwards after 3 warm-up on a CPU" in objectives.get("latency_ms").how
    assert measure.repeats("cpu", "latency") == (3, 15) and measure.BATCH == objectives.MEASURE_BATCH == 64
    assert f"batch {measure.BATCH}" in objectives.get("throughput").unit
    assert objectives.names("measured") == ["latency_ms", "throughput", "inference_memory"]


# --------------------------------------------------------------------------- a search judged by latency


@pytest.fixture(scope="module")
def latency_run(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 1-epoch trials of students from 32 to 96 wide, judged by val_acc and latency_ms."""
    from kdsearch.search.run import run_search

    tmp = tmp_path_factory.mktemp("latency")
    space_file = write_space(tmp, digits_teacher_path, trials=3, epochs=1, max_concurrent=1)
    raw = yaml.safe_load(space_file.read_text())
    raw["objectives"] = {"val_acc": "max", "latency_ms": "min"}
    raw["hypervolume"] = {"reference": {"latency_ms": 1000.0}}  # a measured objective has no default reference
    raw["student"].update(embed_dim=[32, 96], depth=[1, 3], num_heads=[2], patch_size=[4])
    del raw["budget"]
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return run_dir(run_search(space_file, storage=tmp / "runs", say=lambda s: None))


def test_a_search_fronts_over_latency(latency_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trials = pd.read_parquet(latency_run / "trials.parquet")
    epochs = pd.read_parquet(latency_run / "epochs.parquet")
    done = trials[trials.status == "completed"]
    assert len(trials) == 3 and len(done) == 3
    assert (done.latency_ms > 0).all() and epochs.latency_ms.notna().all()
    assert "throughput" not in trials  # only the run's objectives are measured
    mask = non_dominated_mask(done[["val_acc", "latency_ms"]].to_numpy(), [True, False])
    assert run_cli(["pareto", str(latency_run), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objectives"] == [["val_acc", "max"], ["latency_ms", "min"]]
    assert sorted(r["trial_id"] for r in out["front"]) == sorted(done.trial_id[mask])
    assert out["units"]["latency_ms"] == "milliseconds per forward of one image (batch 1)"
    assert out["hypervolume"]["value"] > 0 and out["hypervolume"]["reference"] == {"val_acc": 0.0, "latency_ms": 1000.0}


def test_measure_writes_measured_parquet(latency_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(latency_run)
    assert run_cli(["measure", run, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    front = json.loads((run_cli(["pareto", run, "--format", "json"]), capsys.readouterr().out)[1])["front"]
    assert [r["trial_id"] for r in out["measured"]] == [r["trial_id"] for r in front]
    for r in out["measured"]:
        assert r["device"] == "cpu" and r["runtime"] == "torch" and r["batch"] == 64
        assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["inference_memory"] > 0
    table = pd.read_parquet(latency_run / "measured.parquet")
    assert list(table.columns[:4]) == ["trial_id", "device", "runtime", "device_name"] and len(table) == len(front)

    one = front[0]["trial_id"]
    assert run_cli(["measure", run, "--trial", one, "--runtime", "onnx", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("trial_id,device,runtime,device_name,batch,latency_ms") and len(lines) == 2
    assert run_cli(["measure", run, "--trial", one]) == 0  # measured again: its row replaced
    shown = capsys.readouterr().out
    assert "latency ms" in shown and "inference MiB" in shown and one in shown
    table = pd.read_parquet(latency_run / "measured.parquet")
    assert len(table) == len(front) + 1
    onnx = table[table.runtime == "onnx"].iloc[0]
    assert onnx.trial_id == one and onnx.latency_ms > 0 and onnx.throughput > 0 and pd.isna(onnx.inference_memory)

    assert run_cli(["measure", run, "--trial", "nope"]) == 2
    assert "--trial nope: no such trial" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli(["measure", run, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device cuda: no CUDA GPU is visible here" in err
