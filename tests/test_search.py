"""The search on a real local Ray with a real Optuna study and real trials (no mocks)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from kdsearch.results.outcomes import STATUSES
from kdsearch.space.specs import TrialSpec
from tests.helpers import run_cli, run_dir


@pytest.fixture(scope="module")
def local_search(small_run):
    return small_run


def test_search_records_every_trial(local_search) -> None:
    result, _ = local_search
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    assert len(trials) == 8 and trials.trial_id.is_unique
    assert set(trials.status) <= set(STATUSES)
    assert {"completed", "stopped_early", "infeasible"} <= set(trials.status), trials.status.tolist()
    for col in (
        "trial_id",
        "status",
        "val_acc",
        "flops",
        "macs",
        "params",
        "epochs",
        "wall_seconds",
        "checkpoint",
        "error",
        "student.depth",
        "student.pos_embed",
        "recipe.alpha",
        "train.epochs",
    ):
        assert col in trials.columns
    # every row rebuilds its TrialSpec from its own config columns
    for _, row in trials.iterrows():
        spec = TrialSpec.from_dict(
            {k: row[k] for k in trials.columns if k.split(".")[0] in ("student", "recipe", "train", "data", "teacher")}
        )
        assert spec.student.depth == row["student.depth"]


def test_rows_agree_with_ray_and_optuna(local_search) -> None:
    result, _ = local_search
    trials = pd.read_parquet(run_dir(result) / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run_dir(result) / 'study.db'}")
    by_number = {t.number: t for t in study.trials}
    ray_results = {r.metrics["trial_id"]: r.metrics for r in result.grid}
    assert set(ray_results) == set(trials.index)
    for tid, row in trials.iterrows():
        ray_last = ray_results[tid]
        ot = by_number[row["optuna_trial"]]
        assert ot.params["student.depth"] == row["student.depth"]
        assert ot.params["recipe.alpha"] == row["recipe.alpha"]
        if row.status == "completed":
            assert ot.state == optuna.trial.TrialState.COMPLETE
            assert ot.values == [row.val_acc, row.flops]
            assert ray_last["val_acc"] == row.val_acc and ray_last["epoch"] == row.epochs == row.epochs_total
            assert row.checkpoint == f"trials/{tid}/model.safetensors" and (run_dir(result) / row.checkpoint).is_file()
            assert row.checkpoint_epoch == row.epochs_total
        elif row.status == "stopped_early":
            # never told to Optuna as finished with an early-epoch accuracy
            assert ot.state == optuna.trial.TrialState.PRUNED and ot.values is None
            assert 0 < row.epochs < row.epochs_total and ray_last["epoch"] == row.epochs
            # its weights at the epoch it stopped at, from its last checkpoint (one per epoch by default)
            assert row.checkpoint == f"trials/{tid}/model.safetensors" and (run_dir(result) / row.checkpoint).is_file()
            assert row.checkpoint_epoch == row.epochs
        assert len(epochs[epochs.trial_id == tid]) == row.epochs


def test_infeasible_configs_cost_no_training(local_search) -> None:
    result, _ = local_search
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run_dir(result) / 'study.db'}")
    infeasible = trials[trials.status == "infeasible"]
    assert len(infeasible)
    for _, row in infeasible.iterrows():
        assert row.flops > 0.004e9 and row.epochs == 0 and pd.isna(row.checkpoint) and pd.isna(row.val_acc)
        assert not (run_dir(result) / "trials" / row.trial_id).exists()
        assert row.trial_id not in set(epochs.trial_id)
        ot = study.trials[row.optuna_trial]
        assert ot.system_attrs["constraints:max_gflops"] > 0  # the sampler saw it as infeasible
    feasible = trials[trials.status != "infeasible"]
    assert all(study.trials[n].system_attrs["constraints:max_gflops"] <= 0 for n in feasible.optuna_trial)
    # and Optuna keeps it off its own front
    assert all(t.system_attrs["constraints:max_gflops"] <= 0 for t in study.best_trials)


def test_front_is_the_non_dominated_completed_trials(local_search) -> None:
    result, _ = local_search
    done = [r for r in result.trials if r["status"] == "completed"]
    front_ids = {r["trial_id"] for r in result.front}
    for r in done:
        dominated = any(
            o["val_acc"] >= r["val_acc"]
            and o["flops"] <= r["flops"]
            and (o["val_acc"], o["flops"]) != (r["val_acc"], r["flops"])
            for o in done
        )
        assert (r["trial_id"] in front_ids) == (not dominated)


def test_status_command_reads_the_files(local_search, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    result, _ = local_search
    assert run_cli(["status", str(run_dir(result)), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    assert status["finished"] == 8 and status["running"] == 0
    assert status["stopped_early"] == (trials.status == "stopped_early").sum()
    assert [f["trial_id"] for f in status["front"]] == [r["trial_id"] for r in result.front]
    assert status["throughput"]["images_per_second"] > 0 and 0 < status["throughput"]["data_wait_share"] < 1
    assert "mfu" not in status["throughput"]  # never measured on a CPU
    assert run_cli(["status", str(run_dir(result))]) == 0
    out = capsys.readouterr().out
    assert "front so far" in out and "images/s, waiting for data" in out


def test_existing_run_needs_resume(
    local_search, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from kdsearch.search.run import run_search

    result, space = local_search
    storage = run_dir(result).parent
    # resuming the finished run starts Ray, loads the data and the teacher's logits, and trains nothing;
    # Ray's environment switches apply only while it runs, and one the caller set keeps its value
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    for name in ("RAY_AIR_NEW_OUTPUT", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"):
        monkeypatch.delenv(name, raising=False)  # unset, whatever an earlier search in this process left
    before, said = dict(os.environ), []
    again = run_search(space, storage=storage, resume=True, say=said.append)
    assert dict(os.environ) == before
    assert len(again.trials) == 8 and any("already has 8 trials" in line for line in said), said
    assert run_cli(["search", str(space), "--storage", str(storage)]) == 2
    assert "use --resume" in capsys.readouterr().err
    assert run_cli(["search", str(space), "--storage", str(storage), "--name", "nothing", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert run_cli(["status", str(storage / "nothing")]) == 2


def test_unreachable_address_is_one_line(local_search, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.s3 import free_port

    _, space = local_search
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert run_cli(["search", str(space), "--address", address, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdsearch: error: --address {address}: no Ray cluster answers there (Connection refused)"]
    assert not (tmp_path / "digits_search").exists()  # no run was started


def test_more_gpus_than_the_machine_has_is_one_line(digits_teacher_path: Path, tmp_path: Path, capsys) -> None:
    import torch
    import yaml

    from tests.helpers import write_space

    space = write_space(tmp_path, digits_teacher_path)
    raw = yaml.safe_load(space.read_text())
    raw["resources"] = {"cpus": 1, "gpus": torch.cuda.device_count() + 2}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"resources.gpus: each trial asks for {torch.cuda.device_count() + 2} GPUs" in err[0]
    assert not (tmp_path / "runs" / "digits_search").exists()
