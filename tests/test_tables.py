"""trials.parquet and epochs.parquet written as parts (kdsearch.results.parts): every reader
sees one table at any moment, the last row of a trial wins, compaction is atomic, and a
bucket holds the same layout. No Ray: the writer and readers alone."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kdsearch.results.parts import PartsWriter, list_parts, parts_dir
from kdsearch.results.tables import (
    EPOCH_COLUMNS,
    TRIAL_COLUMNS,
    RunPaths,
    latest_epochs,
    latest_trials,
    read_rows,
)
from kdsearch.storage import Storage
from tests.s3 import environment, make_bucket, s3_server

TRIALS, EPOCHS = RunPaths.TRIALS, RunPaths.EPOCHS


def trial(i: int, status: str = "completed", **extra) -> dict:
    return {"trial_id": f"t{i:05d}", "status": status, "val_acc": i / 100, "flops": 1000 + i, **extra}


def writer(store: Storage, name: str = TRIALS, fanout: int = 8) -> PartsWriter:
    rule = latest_trials if name == TRIALS else latest_epochs
    return PartsWriter(store, name, TRIAL_COLUMNS if name == TRIALS else EPOCH_COLUMNS, rule, fanout=fanout)


def test_every_append_is_read_back_and_the_end_is_one_file(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "run")
    w = writer(store, fanout=3)
    for i in range(40):
        w.append([trial(i)])
        rows = read_rows(store, TRIALS)
        assert [r["trial_id"] for r in rows] == [f"t{j:05d}" for j in range(i + 1)]
        assert w.parts <= 3 * 4  # fanout per level, few levels: reading stays cheap
    assert list_parts(store, TRIALS), "the run is mid-way: some rows are in parts"
    w.compact()
    assert not list_parts(store, TRIALS) and not (tmp_path / "run" / parts_dir(TRIALS)).exists()
    # one plain Parquet file again: pandas and pyarrow read it as the table
    assert pd.read_parquet(tmp_path / "run" / TRIALS).trial_id.tolist() == [f"t{j:05d}" for j in range(40)]
    assert ds.dataset(tmp_path / "run" / TRIALS).to_table().num_rows == 40


def test_the_last_row_of_a_trial_wins(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "run")
    w = writer(store, fanout=2)
    w.append([trial(1), trial(2)])
    w.append([trial(3)])
    w.append([trial(2, "failed", error="boom")])  # a resumed trial re-recorded: replaces its row
    w.append([trial(4)])
    rows = {r["trial_id"]: r for r in read_rows(store, TRIALS)}
    assert len(rows) == 4 and rows["t00002"]["status"] == "failed" and rows["t00002"]["error"] == "boom"
    w.compact()
    after = {r["trial_id"]: r for r in read_rows(store, TRIALS)}
    assert after == rows
    assert pq.read_table(tmp_path / "run" / TRIALS).num_rows == 4


def test_a_retry_replaces_the_epochs_it_trains_again(tmp_path: Path) -> None:
    store = Storage.open(tmp_path / "run")
    w = writer(store, EPOCHS, fanout=2)
    e = lambda t, n, acc: {"trial_id": t, "epoch": n, "val_acc": acc}  # noqa: E731
    w.append([e("a", 1, 0.1), e("a", 2, 0.2), e("a", 3, 0.3), e("b", 1, 0.5)])
    w.append([e("a", 1, 0.15)])  # a retry from epoch 1: the failed attempt's 2 and 3 are gone
    w.append([e("b", 2, 0.6), e("a", 2, 0.25)])
    want = [("a", 1, 0.15), ("a", 2, 0.25), ("b", 1, 0.5), ("b", 2, 0.6)]
    got = lambda: [(r["trial_id"], r["epoch"], r["val_acc"]) for r in read_rows(store, EPOCHS)]  # noqa: E731
    assert got() == want
    w.compact()
    assert got() == want


def test_readers_see_one_whole_table_while_parts_merge_and_compact(tmp_path: Path) -> None:
    """A reader thread reads through every append, merge and compaction: each read is the
    table after some number of appends (ids 0..k, each trial's latest row), never less than the
    read before; the compacted file alone is always a whole Parquet table.

    Trial j (j % 5 == 0) is recorded again (flops 0) right after trial j + 4, in a later part
    than its first row: a reader that sees any trial after j + 4 must see j's later row, so a
    reader folding parts out of order (or keeping a trial's first row) shows an old row."""
    store = Storage.open(tmp_path / "run")
    w = writer(store, fanout=2)
    done, problems, seen = threading.Event(), [], []
    rerecorded = lambda r: int(r["trial_id"][1:]) % 5 == 0  # noqa: E731

    def read() -> None:
        while not done.is_set():
            try:
                rows = read_rows(store, TRIALS)
                ids = [r["trial_id"] for r in rows]
                if ids != [f"t{j:05d}" for j in range(len(ids))]:
                    problems.append(f"not a prefix: {ids[:5]}...")
                last = len(ids) - 1
                old = [
                    r["trial_id"] for r in rows if rerecorded(r) and last > int(r["trial_id"][1:]) + 4 and r["flops"]
                ]
                if old:
                    problems.append(f"an old row of a re-recorded trial: {old[:3]} beside {ids[-1]}")
                if seen and len(ids) < seen[-1]:
                    problems.append(f"went back from {seen[-1]} to {len(ids)} rows")
                seen.append(len(ids))
                if (tmp_path / "run" / TRIALS).exists():  # never torn: its bytes, read once, are a whole table
                    # (by path, pyarrow opens the file twice, footer then pages: a compaction between the two is
                    # a mismatch, not a torn file; the layout's docstring says so)
                    pd.read_parquet(io.BytesIO((tmp_path / "run" / TRIALS).read_bytes()))
            except Exception as e:  # noqa: BLE001 - any failure to read is what this test looks for
                problems.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(80):
            w.append([trial(i)])
            if i % 5 == 4:  # an earlier trial recorded again, later, in a part of its own: the later row wins
                w.append([trial(i - 4, flops=0)])
    finally:
        done.set()
        reader.join()
    w.compact()
    assert not problems, problems[:5]
    assert len(seen) > 10 and seen[-1] >= 50
    rows = read_rows(store, TRIALS)
    assert len(rows) == 80 and all(r["flops"] == 0 for r in rows if rerecorded(r))
    assert sum(r["flops"] == 0 for r in rows) == 16


def test_a_resumed_writer_continues_a_run_with_parts_and_a_single_file(tmp_path: Path) -> None:
    """A driver killed mid-run leaves the file, parts and a temporary file; an older run has
    the single file only. Both read as before, and the next writer continues after them."""
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame([trial(0), trial(1)]).to_parquet(run / TRIALS, index=False)  # an older run's table
    store = Storage.open(run)
    assert [r["trial_id"] for r in read_rows(store, TRIALS)] == ["t00000", "t00001"]
    first = writer(store)
    first.append([trial(2)])
    first.append([trial(3)])
    first.append([trial(4, "running")])
    assert list_parts(store, TRIALS), "the killed driver left parts"
    (run / parts_dir(TRIALS) / ".part-000000009-0.parquet.123.tmp").write_bytes(b"half a part")  # killed mid-write
    assert len(read_rows(store, TRIALS)) == 5
    second = writer(store)  # the resumed driver
    second.append([trial(1, "failed")])
    rows = {r["trial_id"]: r["status"] for r in read_rows(store, TRIALS)}
    assert rows == {
        "t00000": "completed",
        "t00001": "failed",
        "t00002": "completed",
        "t00003": "completed",
        "t00004": "running",
    }
    second.compact()
    assert {r["trial_id"]: r["status"] for r in pd.read_parquet(run / TRIALS).to_dict("records")} == rows


def test_parts_in_a_bucket(tmp_path: Path) -> None:
    bucket = "kdsearch-tables"
    with s3_server(tmp_path / "moto.log") as env:
        make_bucket(env, bucket)
        with environment(env):
            store = Storage.open(f"s3://{bucket}/runs/r1")
            w = writer(store, fanout=2)
            in_parts = []
            for i in range(7):
                w.append([trial(i)])
                in_parts.append(len(list_parts(store, TRIALS)))
            w.append([trial(3, "failed")])
            assert max(in_parts) >= 2, "parts are objects under trials.parts/"
            rows = read_rows(store, TRIALS)
            assert len(rows) == 7 and rows[3]["status"] == "failed"
            # the file alone is a whole table too, read straight from the bucket
            fs, root = store.fs, store.path(TRIALS)
            with fs.open_input_stream(root) as f:
                assert pq.read_table(pa.BufferReader(f.read())).num_rows >= 1
            w.compact()
            assert not list_parts(store, TRIALS)
            assert read_rows(store, TRIALS) == rows
            assert pq.read_table(root, filesystem=fs).num_rows == 7
