"""A run in a gs:// bucket through pyarrow's GcsFileSystem, against a GCS emulator on 127.0.0.1
(gcp-storage-emulator, tests/gcs.py): the storage's reads, writes, lists and deletes, the tables
written as parts, and a whole search whose tables, weights and Ray Tune state live in the bucket
and which every command reads from its URI."""

from __future__ import annotations

import io
import json
import pickle
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kdsearch.results.parts import PartsWriter, list_parts
from kdsearch.results.tables import TRIAL_COLUMNS, RunPaths, latest_trials, read_rows
from kdsearch.storage import Storage
from tests.gcs import gcs_server
from tests.helpers import run_cli, train_every_trial, write_space
from tests.s3 import environment

BUCKET = "kdsearch-gcs"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory):
    """The emulator's query for gs:// URIs (`endpoint_override=...&scheme=http`), with this process
    (and the Ray a search starts) holding the credentials that reach it."""
    with gcs_server(tmp_path_factory.mktemp("gcs"), BUCKET) as (env, query), environment(env):
        yield query


def objects(query: str) -> list[str]:
    """Every object name in the bucket, as GCS's JSON API lists it (a `key/` folder marker included)."""
    endpoint = dict(kv.split("=", 1) for kv in query.split("&"))["endpoint_override"]
    with urllib.request.urlopen(f"http://{endpoint}/storage/v1/b/{BUCKET}/o", timeout=10) as answer:
        return sorted(item["name"] for item in json.load(answer).get("items", []))


def test_a_storage_in_a_gs_bucket_reads_writes_lists_and_deletes(gcs: str) -> None:
    store = Storage.open(f"gs://{BUCKET}/runs/one?{gcs}")
    assert store.object_store and store.uri == f"gs://{BUCKET}/runs/one?{gcs}"
    store.check_writable()  # the probe leaves nothing behind
    store.write_text("run.json", '{"trials": 3}')
    store.write_bytes("trials/t1/model.safetensors", b"weights")
    assert store.read_text("run.json") == '{"trials": 3}' and store.exists("trials/t1/model.safetensors")
    assert sorted(store.files()) == ["run.json"] and store.files("trials/t1") == ["model.safetensors"]
    # the tables as parts, folded by their rule, then compacted into one Parquet object
    w = PartsWriter(store, RunPaths.TRIALS, TRIAL_COLUMNS, latest_trials, fanout=2)
    for i in range(5):
        w.append([{"trial_id": f"t{i}", "status": "completed", "val_acc": i / 10}])
    w.append([{"trial_id": "t2", "status": "failed", "val_acc": None}])
    assert list_parts(store, RunPaths.TRIALS), "rows are in parts under trials.parts/"
    rows = read_rows(store, RunPaths.TRIALS)
    assert [r["trial_id"] for r in rows] == ["t0", "t1", "t2", "t3", "t4"] and rows[2]["status"] == "failed"
    w.compact()
    assert not list_parts(store, RunPaths.TRIALS) and read_rows(store, RunPaths.TRIALS) == rows
    with store.fs.open_input_stream(store.path(RunPaths.TRIALS)) as f:
        assert pq.read_table(io.BytesIO(f.read())).num_rows == 5
    # a worker's copy opens the same bucket through the URI's query
    again = pickle.loads(pickle.dumps(store))
    assert again.read_text("run.json") == '{"trials": 3}'
    store.delete("run.json")
    assert not store.exists("run.json")
    # no folder markers and no probe left: only the objects written
    assert objects(gcs) == ["runs/one/trials.parquet", "runs/one/trials/t1/model.safetensors"]


def test_a_search_runs_into_a_gs_bucket_and_the_cli_reads_it(
    gcs: str, digits_teacher_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdsearch.search.run import run_search

    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=2, epochs=1, max_concurrent=1))
    storage = f"gs://{BUCKET}/searches?{gcs}"
    result = run_search(space, storage=storage, say=lambda s: None)
    run = f"gs://{BUCKET}/searches/digits_search?{gcs}"
    assert result.paths.uri == run
    names = objects(gcs)
    inside = [n.removeprefix("searches/digits_search/") for n in names if n.startswith("searches/digits_search/")]
    for name in ("space.yaml", "run.json", "trials.parquet", "epochs.parquet", "study.db"):
        assert name in inside, names
    assert any(n.startswith("tune/") for n in inside), "Ray Tune's experiment state is in the bucket"
    assert any(n.startswith("searches/cache/teacher-logits-") for n in names), names
    trials = pd.DataFrame(RunPaths(Storage.open(run)).rows(RunPaths.TRIALS))
    assert len(trials) == 2 and (trials.status == "completed").all()
    for _, row in trials.iterrows():
        assert row.checkpoint == f"trials/{row.trial_id}/model.safetensors" and row.checkpoint in inside
    assert run_cli(["status", run, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["finished"] == status["completed"] == 2 and len(status["front"]) >= 1, status
