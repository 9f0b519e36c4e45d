"""`--track`: one real search logged to MLflow (a SQLite store), W&B (offline) and TensorBoard at
once, each read back with its own library; a tracker that cannot be reached; one not installed."""

from __future__ import annotations

import importlib.util
import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from kdsearch.errors import KdsearchError, SpaceError
from kdsearch.results.hypervolume import hypervolume_of, run_reference
from kdsearch.results.tables import RunPaths
from kdsearch.search.trackers import parse_track
from kdsearch.space.file import load_space
from tests.helpers import missing, run_cli, write_space

MISSING = [name for name in ("mlflow", "wandb", "tensorboard") if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module", autouse=True)
def trackers_installed() -> None:
    """Each test needs the trackers' packages (the dev extra installs them): skipped without, failed in CI."""
    if MISSING:
        missing(f"{', '.join(MISSING)} not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def tracked(shared_ray, digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One search of 3 trials x 2 epochs, tracked by all three trackers; what it said and wrote."""
    from kdsearch.search.run import run_search

    tmp = tmp_path_factory.mktemp("tracked")
    space = _without_teacher_signal(write_space(tmp, digits_teacher_path, trials=3, epochs=2))
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact root, ./mlruns, lands here
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.delenv("WANDB_PROJECT", raising=False)
        result = run_search(space, storage=tmp / "runs", say=lines.append, track=["mlflow", "wandb,tensorboard"])
    return {"tmp": tmp, "result": result, "lines": lines}


def test_track_names_and_the_space_key(tmp_path: Path, digits_teacher_path: Path) -> None:
    assert parse_track(["mlflow", "wandb,tensorboard", "mlflow"]) == ("mlflow", "wandb", "tensorboard")
    with pytest.raises(KdsearchError, match=r"--track 'neptune': not a tracker; allowed: mlflow, wandb, tensorboard"):
        parse_track(["mlflow,neptune"])
    space = write_space(tmp_path, digits_teacher_path)
    text = space.read_text()
    space.write_text(text.replace("max_failures: 2,", "max_failures: 2, track: [tensorboard, mlflow],"))
    assert load_space(space).search.track == ("tensorboard", "mlflow")
    space.write_text(text.replace("max_failures: 2,", "max_failures: 2, track: wandb,"))
    assert load_space(space).search.track == ("wandb",)
    space.write_text(text.replace("max_failures: 2,", "max_failures: 2, track: [mlflow, comet],"))
    with pytest.raises(SpaceError, match=r"search.track.*a list of trackers: mlflow, wandb, tensorboard"):
        load_space(space)


def test_mlflow_has_a_parent_run_and_a_child_per_trial(tracked: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    tmp, result = tracked["tmp"], tracked["result"]
    assert not [ln for ln in tracked["lines"] if "--track" in ln], tracked["lines"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits_search")  # the space's name
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["digits_search"]
    parent = parents[0]
    children = {r.data.tags["kdsearch_trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    trials = {r["trial_id"]: r for r in result.trials}
    assert set(children) == set(trials) and len(trials) == 3
    assert "completed" in {r["status"] for r in trials.values()}  # the epochs' checks below see a trained trial
    epochs = result.paths.rows(RunPaths.EPOCHS)
    for tid, run in children.items():
        row = trials[tid]
        assert run.data.tags["status"] == row["status"]
        assert run.data.params["student.embed_dim"] == str(row["student.embed_dim"])
        assert run.data.params["recipe.alpha"] == str(row["recipe.alpha"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        curve = [(e["epoch"], e["val_acc"]) for e in epochs if e["trial_id"] == tid]
        history = sorted((m.step, m.value) for m in history)
        assert [s for s, _ in history] == [s for s, _ in curve]
        assert [v for _, v in history] == pytest.approx([v for _, v in curve])
        if row["status"] == "completed":
            assert [s for s, _ in curve] == [1, 2]
            assert run.data.metrics["final.val_acc"] == pytest.approx(row["val_acc"])
        assert run.data.metrics["final.flops"] == pytest.approx(row["flops"])
    front = client.download_artifacts(parent.info.run_id, "front.json", str(tmp))
    assert {r["trial_id"] for r in json.loads(Path(front).read_text())} == {r["trial_id"] for r in result.front}
    hv = _hypervolume(result)
    assert client.get_metric_history(parent.info.run_id, "hypervolume")[-1].value == pytest.approx(hv)


def test_wandb_offline_runs_are_grouped_under_the_search(tracked: dict[str, Any]) -> None:
    result = tracked["result"]
    runs = [_wandb_run(f) for f in sorted(tracked["tmp"].glob("wandb/offline-run-*/*.wandb"))]
    assert {r["group"] for r in runs} == {"digits_search"}
    trials = {r["trial_id"]: r for r in result.trials}
    by_name = {r["name"]: r for r in runs}
    assert set(by_name) == {*trials, "digits_search-summary"}
    for tid, row in trials.items():
        run = by_name[tid]
        assert run["config"]["student.depth"] == row["student.depth"]
        assert run["summary"]["status"] == row["status"]
        if row["status"] == "completed":
            assert [s for s, _ in run["history"]["val_acc"]] == [1, 2]
            assert run["history"]["val_acc"][-1][1] == pytest.approx(row["val_acc"])
    assert by_name["digits_search-summary"]["summary"]["hypervolume"] == pytest.approx(_hypervolume(result))


def test_tensorboard_has_a_folder_per_trial_in_the_run(tracked: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked["result"]
    root = result.paths.store.local_path("tensorboard")
    epochs = result.paths.rows(RunPaths.EPOCHS)
    for row in result.trials:
        events = EventAccumulator(str(root / row["trial_id"]))
        events.Reload()
        curve = [(e["epoch"], e["val_acc"]) for e in epochs if e["trial_id"] == row["trial_id"]]
        if curve:
            scalars = events.Scalars("val_acc")
            assert [s.step for s in scalars] == [s for s, _ in curve]
            assert [s.value for s in scalars] == pytest.approx([v for _, v in curve])
        assert events.Scalars("final/flops")[0].value == pytest.approx(row["flops"])
        text = events.Tensors("status/text_summary")[0].tensor_proto.string_val[0].decode()
        assert text == row["status"]
    search = EventAccumulator(str(root))
    search.Reload()
    assert search.Scalars("hypervolume")[-1].value == pytest.approx(_hypervolume(result))
    assert (root / "front.csv").read_text().splitlines()[0].startswith("trial_id,val_acc,flops,")


def test_an_unreachable_tracker_is_one_line_and_the_search_goes_on(
    shared_ray,
    digits_teacher_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    space = _without_teacher_signal(write_space(tmp_path, digits_teacher_path, trials=1, epochs=1))
    space.write_text(
        space.read_text().replace("budget: {max_gflops: 0.004}", "budget: {max_gflops: null}")
    )  # it trains
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs"), "--track", "mlflow"]) == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if "mlflow" in ln]
    # one line, not one per trial, result or end: the tracker is off after its first failure
    assert len(said) == 1, err
    assert said[0].startswith(f"--track mlflow: http://127.0.0.1:{port} does not answer"), said[0]
    assert said[0].endswith("mlflow is off for the rest of this search"), said[0]
    assert "1/1 trials  completed 1" in err, err  # the search ran to its end


def test_a_tracker_not_installed_is_one_line_before_ray_starts(
    digits_teacher_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is not installed
    space = write_space(tmp_path, digits_teacher_path)
    assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs"), "--track", "wandb"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("install it with: pip install 'kdsearch[wandb]'"), lines
    assert not (tmp_path / "runs" / "digits_search").exists()  # nothing started


def _without_teacher_signal(space: Path) -> Path:
    """The space with recipe.alpha 0: no teacher logits to cache (seconds a search saves here)."""
    text = space.read_text()
    assert "alpha: {low: 0.0, high: 1.0}" in text
    space.write_text(text.replace("alpha: {low: 0.0, high: 1.0}", "alpha: 0.0"))
    return space


def _hypervolume(result: Any) -> float:
    objectives = result.paths.meta()["objectives"]
    objectives = [tuple(o) for o in objectives]
    reference, _ = run_reference(result.paths, result.paths.meta(), objectives)
    return hypervolume_of(result.trials, objectives, reference).value


def _wandb_run(path: Path) -> dict[str, Any]:
    """An offline W&B run read from its .wandb file: its name, group, config, summary and history.

    NOTE: wandb 0.31 has no Python reader of its run files (its core is a Go binary); the file is
    LevelDB's log format (32 KiB blocks of records, each crc32c, length, type) after a 7-byte
    W&B header, each record one wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": {}}
    i, pending = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + 7])
        pending, i = pending + data[i + 7 : i + 7 + length], i + 7 + length
        if kind not in (1, 4):  # a record's first or middle part
            continue
        record, pending = pb.Record.FromString(pending), b""
        which = record.WhichOneof("record_type")
        if which == "run":
            out.update(name=record.run.display_name, group=record.run.run_group)
            out["config"].update({c.key: json.loads(c.value_json) for c in record.run.config.update})
        elif which == "summary":
            out["summary"].update(
                {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update}
            )
        elif which == "history":
            items = {h.key or "/".join(h.nested_key): json.loads(h.value_json) for h in record.history.item}
            for k, v in items.items():
                out["history"].setdefault(k, []).append((items.get("_step"), v))
    return out


def test_tensorboard_of_a_run_in_a_bucket_is_written_locally_then_uploaded(tmp_path: Path) -> None:
    """The backend alone (it runs in the driver), on pyarrow's in-memory filesystem: a storage
    with no local path, as a bucket is."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdsearch.search.tracker_backends import TensorboardTracker, TrackedRun
    from kdsearch.storage import Storage

    store = Storage.open("mock:///runs").child("bucketed")
    assert store.local_path() is None
    tracker = TensorboardTracker()
    tracker.start(TrackedRun("bucketed", "digits_search", store, "tensorboard"))
    tracker.trial_start("t1", "t1", {"student.depth": 2, "train.max_minutes": None})
    tracker.epoch("t1", 1, {"val_acc": 0.5})
    tracker.epoch("t1", 2, {"val_acc": 0.75})
    tracker.trial_end("t1", "completed", {"val_acc": 0.75, "flops": 1e6})
    uploaded = store.fs.get_file_info(store.path("tensorboard/t1"))
    assert uploaded.type.name == "Directory"  # the trial's folder went up when it ended
    tracker.end({"columns": ["trial_id", "val_acc"], "rows": [["t1", 0.75]], "history": [(1, 0.25)]})
    assert not Path(tracker.root).exists()  # the local folder is gone
    for rel in _files(store, "tensorboard"):  # copied back, then read as a user would
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(store.read_bytes(rel))
    assert (tmp_path / "tensorboard/front.csv").read_text().splitlines() == ["trial_id,val_acc", "t1,0.75"]
    trial = EventAccumulator(str(tmp_path / "tensorboard/t1"))
    trial.Reload()
    assert [(s.step, s.value) for s in trial.Scalars("val_acc")] == [(1, 0.5), (2, 0.75)]
    search = EventAccumulator(str(tmp_path / "tensorboard"))
    search.Reload()
    assert [(s.step, s.value) for s in search.Scalars("hypervolume")] == [(1, 0.25)]


def _files(store: Any, rel: str) -> list[str]:
    from pyarrow.fs import FileSelector

    infos = store.fs.get_file_info(FileSelector(store.path(rel), recursive=True))
    root = store.path()
    return [i.path[len(root) :].lstrip("/") for i in infos if i.type.name == "File"]
