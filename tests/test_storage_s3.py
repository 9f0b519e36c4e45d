"""A whole run in a bucket: a real S3-compatible server on 127.0.0.1 (moto's server mode), a
real local Ray, no shared disk assumed: tables, weights, the teacher-logit cache, the study and
Ray Tune's state all live in the bucket, and every command reads the run from its URI."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from kdsearch.errors import KdsearchError
from kdsearch.results.tables import RunPaths
from tests.helpers import one_ray, run_cli, search_stopped_by_storage, train_every_trial, write_space
from tests.s3 import TcpProxy, bucket_names, environment, list_keys, make_bucket, raw_keys, s3_server
from tests.test_search_faults import wait_for

BUCKET = "kdsearch-test"
RUNS = f"s3://{BUCKET}/runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        make_bucket(env, BUCKET)
        with environment(env):  # this process and the Ray it starts reach the bucket the usual way
            yield env


@pytest.fixture(scope="module")
def s3_ray(s3):
    """One embedded Ray for the module's searches in s3's environment (its workers reach the
    bucket the usual way)."""
    with one_ray():
        yield


def _home_results() -> set[str]:
    folder = Path.home() / "ray_results"
    return {str(p) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture(scope="module")
def s3_run(s3, s3_ray, digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One search of 4 trials with --storage s3://..., run from an empty working directory."""
    from kdsearch.search.run import run_search

    space = write_space(tmp_path_factory.mktemp("s3space"), digits_teacher_path, trials=4, epochs=2, max_concurrent=1)
    cwd = tmp_path_factory.mktemp("s3cwd")
    before, old = _home_results(), os.getcwd()
    os.chdir(cwd)
    messages: list[str] = []
    try:
        result = run_search(space, storage=RUNS, say=messages.append)
    finally:
        os.chdir(old)
    return result, space, messages, cwd, before


def read_table(uri: str) -> pd.DataFrame:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return pq.read_table(io.BytesIO(f.read())).to_pandas()


def test_everything_a_run_has_is_in_the_bucket(s3, s3_run) -> None:
    result, _, messages, cwd, before = s3_run
    assert result.paths.uri == f"{RUNS}/digits_search"
    keys = list_keys(s3, RUNS)
    run = [k.removeprefix("digits_search/") for k in keys if k.startswith("digits_search/")]
    for name in ("space.yaml", "run.json", "trials.parquet", "epochs.parquet", "study.db", "front.png"):
        if name != "front.png":  # the CLI draws the picture; run_search does not
            assert name in run, keys
    assert any(k.startswith("tune/") for k in run), "Ray Tune's experiment state is in the bucket"
    assert any(k.startswith("cache/teacher-logits-") and k.endswith(".values.npy") for k in keys), keys
    trials = read_table(f"{RUNS}/digits_search/trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique
    done = trials[trials.status == "completed"]
    assert len(done)
    import torch

    # a trial that asks for no GPU trains on one torch sees (Ray leaves CUDA_VISIBLE_DEVICES alone at zero GPUs)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for _, row in done.iterrows():
        assert row.checkpoint == f"trials/{row.trial_id}/model.safetensors"  # relative: the run can move
        assert row.checkpoint in run and f"trials/{row.trial_id}/trial_spec.json" in run
        assert row.node_id and row.host and row.gpu == gpu  # where it ran
    # nothing was written to the local disk outside temporary folders
    assert list(cwd.iterdir()) == []
    assert _home_results() == before
    assert any("teacher logits cached once for the search" in m and "Ray task" in m for m in messages), messages


def test_commands_read_the_run_from_its_uri(s3, s3_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = f"{RUNS}/digits_search"
    assert run_cli(["status", run, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["finished"] == 4
    assert run_cli(["pareto", run, "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front["run"] == run and front["front"] and front["hypervolume"]["value"] > 0
    assert run_cli(["report", run, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    best = front["front"][-1]["trial_id"]
    assert run_cli(["export", run, "--trial", best, "--out", str(tmp_path / "student")]) == 0
    card = yaml.safe_load((tmp_path / "student" / "student.yaml").read_text())
    assert card["source"] == {"run": run, "trial_id": best}
    capsys.readouterr()
    assert run_cli(["eval", str(tmp_path / "student"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["val_acc"] == pytest.approx(measured["recorded_val_acc"])


def test_a_second_search_reuses_the_teacher_cache(s3, s3_ray, s3_run) -> None:
    from kdsearch.search.run import run_search

    _, space, _, _, _ = s3_run
    messages: list[str] = []
    run_search(space, storage=RUNS, name="again", trials=1, say=messages.append)
    assert any("reusing the cache" in m for m in messages), messages
    assert not any("cached once" in m for m in messages)


def test_a_bucket_that_does_not_exist_is_one_line(s3, s3_run, capsys: pytest.CaptureFixture[str]) -> None:
    _, space, _, _, _ = s3_run
    buckets = bucket_names(s3)
    # creating buckets allowed in the URI changes nothing: the writability check never creates one
    for storage in ("s3://no-such-bucket/runs", "s3://no-such-bucket/runs?allow_bucket_creation=true"):
        assert run_cli(["search", str(space), "--storage", storage]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"kdsearch: error: --storage {storage}: cannot write there"), err
    assert bucket_names(s3) == buckets
    assert run_cli(["status", f"{RUNS}/no-such-run"]) == 2
    assert "no such run" in capsys.readouterr().err


def test_the_search_left_no_folder_marker_of_its_own(s3, s3_run) -> None:
    """An object store has no folders: kdsearch's writes and deletes (a table's compacted parts, the
    writability probe) leave no `key/` object. Ray Tune's are Tune's: it creates its experiment,
    trial and checkpoint folders with pyarrow's create_dir, which PUTs a marker per level from the
    bucket down (so runs/ and the run's folder too), and deletes old checkpoints with delete_dir,
    which PUTs the parent's back."""
    run, tune = "runs/digits_search/", f"runs/digits_search/{RunPaths.TUNE}/"
    keys = [k for k in raw_keys(s3, BUCKET, "runs/") if k == "runs/" or k.startswith((run, "runs/cache/"))]
    assert any(k.startswith(f"{run}trials.parquet") for k in keys) and any(k.startswith("runs/cache/") for k in keys)
    markers = [k for k in keys if k.endswith("/") and k not in ("runs/", run) and not k.startswith(tune)]
    assert not markers, markers


def test_kdsearch_writes_no_folder_marker_and_creates_no_bucket(s3) -> None:
    """Storage's own operations on S3, each one: no `key/` object, whatever it writes or deletes."""
    from kdsearch.storage import Storage

    store = Storage.open(f"s3://{BUCKET}/markers?allow_bucket_creation=true").child("run")
    store.check_writable()
    store.write_text("a/b/one.txt", "1")
    store.write_text("a/b/two.txt", "2")
    store.delete("a/b/one.txt")  # pyarrow's delete_file would PUT markers/run/a/b/ back
    store.delete("a/b/gone.txt")  # already gone: fine
    assert raw_keys(s3, BUCKET, "markers/") == ["markers/run/a/b/two.txt"]
    assert store.is_dir("a/b") and store.files("a/b") == ["two.txt"]
    store.delete("a/b/two.txt")
    assert raw_keys(s3, BUCKET, "markers/") == [] and not store.exists("a")
    buckets = bucket_names(s3)
    with pytest.raises(KdsearchError, match="cannot write there"):
        Storage.open("s3://no-such-bucket/runs?allow_bucket_creation=true").check_writable()
    assert bucket_names(s3) == buckets


def test_a_storage_carries_the_endpoint_it_reached_not_the_keys(s3) -> None:
    """The endpoint, scheme and region the driver resolved from its environment travel with a
    pickled Storage and with the filesystem Ray Tune pickles; credentials do not; the URI a user
    sees stays as written (their own query kept)."""
    from kdsearch.storage import Storage

    secret = {"AWS_ACCESS_KEY_ID": "AKIDNEVERPICKLED", "AWS_SECRET_ACCESS_KEY": "secret-never-pickled"}
    with environment(secret):
        store = Storage.open(f"{RUNS}/")
        written = Storage.open(f"{RUNS}?region=us-east-1")
    assert store.uri == RUNS and store.child("x").uri_of("y") == f"{RUNS}/x/y"
    assert written.uri == f"{RUNS}?region=us-east-1" and written.child("x").uri == f"{RUNS}/x?region=us-east-1"
    assert "region" not in written.pinned and "region=us-east-1" in store.pinned
    for blob in (pickle.dumps(store), pickle.dumps(store.fs), pickle.dumps(written)):
        assert b"NEVERPICKLED" not in blob and b"never-pickled" not in blob

    # Ray Tune's filesystem, unpickled where no AWS_ENDPOINT_URL is set, reaches the same server
    store.write_text("pinned.txt", "here")
    probe = (
        "import pickle, sys, pyarrow.fs as pafs; fs = pickle.loads(sys.stdin.buffer.read()); "
        "print(fs.open_input_stream(sys.argv[1]).read().decode()); del fs; pafs.finalize_s3()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    read = subprocess.run(
        [sys.executable, "-c", probe, store.path("pinned.txt")],
        input=pickle.dumps(store.fs),
        capture_output=True,
        env={**env, "AWS_EC2_METADATA_DISABLED": "true"},
        timeout=60,
    )
    assert read.returncode == 0 and read.stdout.decode().strip() == "here", read.stderr.decode()[-2000:]

    # unpickled in a driver (Tune's saved searcher on --resume, perhaps elsewhere), a Storage opens as
    # that driver's environment says, as the driver's own Storage.open does
    proxy = TcpProxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    with environment({"AWS_ENDPOINT_URL": proxy.endpoint}):
        again = pickle.loads(pickle.dumps(store))
    assert again.uri == store.uri
    assert parse_qs(store.pinned)["endpoint_override"] == [s3["AWS_ENDPOINT_URL"]]
    assert parse_qs(again.pinned)["endpoint_override"] == [proxy.endpoint]


def _rows(uri: str) -> int:
    try:
        return len(read_table(uri))
    except (OSError, FileNotFoundError):
        return 0


def test_sigkilled_driver_resumes_from_the_bucket_elsewhere(s3, digits_teacher_path: Path, tmp_path: Path) -> None:
    """The driver dies (SIGKILL); its working directory is deleted; the search is resumed from
    another directory and finishes with every trial once: nothing recorded before the kill is
    lost or changed, no config runs twice, no epoch is recorded twice. (The same resume on a
    local folder is this test with another storage: the tables' writes are whole either way.)"""
    from tests.test_search_faults import CONFIG_COLUMNS, kill_driver_when

    # every trial trains for seconds (none is over the budget, which would end it at once), so the
    # four after the second cannot all end between the second's row and the kill
    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=6, epochs=4, seed=7))
    kdsearch = Path(sys.executable).with_name("kdsearch")
    cmd = [str(kdsearch), "search", str(space), "--storage", RUNS, "--name", "killed"]
    trials_uri = f"{RUNS}/killed/trials.parquet"
    first_cwd, second_cwd = tmp_path / "first", tmp_path / "second"
    first_cwd.mkdir()
    second_cwd.mkdir()
    ready = lambda: _rows(trials_uri) >= 2  # noqa: E731
    kill_driver_when(cmd, ready, "two finished trials in the bucket", tmp_path / "first.log", cwd=first_cwd)
    before = read_table(trials_uri)
    assert 2 <= len(before) < 6, "the kill came too late to test a resume"
    shutil.rmtree(first_cwd)  # the first machine's local state is gone

    resumed = subprocess.run(cmd + ["--resume"], cwd=second_cwd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_table(trials_uri)
    assert len(after) == 6 and after.trial_id.is_unique
    assert not after.duplicated(subset=CONFIG_COLUMNS).any(), "a lost attempt's config ran twice"
    kept = after.set_index("trial_id").loc[before.trial_id]  # nothing finished before the kill was lost or changed
    assert (kept.status.values == before.status.values).all()
    assert (kept["recipe.alpha"].values == before["recipe.alpha"].values).all()
    epochs = read_table(f"{RUNS}/killed/epochs.parquet")
    assert not epochs.duplicated(subset=["trial_id", "epoch"]).any()
    assert "front picture: s3://" in resumed.stdout


def test_a_data_root_missing_on_a_node_names_the_node_and_the_path(tmp_path: Path) -> None:
    import socket

    from kdsearch.errors import KdsearchError
    from kdsearch.search.trainable import require_data_here
    from kdsearch.space.specs import DataSpec

    require_data_here(DataSpec(), "n1")  # digits: no root to look for
    require_data_here(DataSpec(name="imagefolder", root=str(tmp_path)), "n1")
    missing = tmp_path / "elsewhere"
    with pytest.raises(
        KdsearchError, match=f"data.root: {missing} does not exist on node {socket.gethostname()} \\(abc"
    ):
        require_data_here(DataSpec(name="imagefolder", root=str(missing)), "abc123")


def test_an_unreachable_storage_stops_the_search_whole_and_resume_continues(
    s3, digits_teacher_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The bucket's endpoint goes away mid-run (a proxy in front of the server stops; the server
    keeps its objects): one line, the tables in the bucket whole, and --resume once it is back."""
    from kdsearch.results.tables import RunPaths, open_run
    from kdsearch.search.run import run_search

    proxy = TcpProxy(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    proxy.start()
    runs = f"s3://{BUCKET}/unreachable"
    run_uri = f"{runs}/digits_search"
    space = write_space(tmp_path, digits_teacher_path, trials=3, epochs=2, max_concurrent=1)

    def trials_recorded() -> int:
        try:
            return len(open_run(run_uri).rows(RunPaths.TRIALS))
        except Exception:  # not there yet
            return 0

    def stop_after_one() -> None:
        wait_for(lambda: trials_recorded() >= 1, 240, "a trial")
        proxy.stop()

    try:
        # the searches, and their one Ray (started here, not the module's), reach the bucket through it
        with environment({"AWS_ENDPOINT_URL": proxy.endpoint}), one_ray():
            search_stopped_by_storage(space, runs, stop_after_one)
            assert "Traceback" not in capfd.readouterr().err

            proxy.start()  # the endpoint is back
            before = pd.DataFrame(open_run(run_uri).rows(RunPaths.TRIALS))
            assert 1 <= len(before) < 3
            result = run_search(space, storage=runs, resume=True, say=lambda s: None)
            after = pd.DataFrame(open_run(run_uri).rows(RunPaths.TRIALS))
    finally:
        proxy.stop()
    assert len(after) == 3 and after.trial_id.is_unique and not result.interrupted
    kept = after.set_index("trial_id").loc[before.trial_id]
    assert (kept.status.values == before.status.values).all()
