"""GPU scheduling on declared GPUs: a `local.sh start 2 --gpus 2` cluster on this CPU machine, whose
two workers each declare 2 GPUs (the head none). Ray schedules on them as on real ones: trials asking
0.5 GPU share one, a trial asking 2 trains data-parallel in two processes, the teacher's cache tasks
run only where GPUs are, and every row names the node and Ray's GPU ids it ran on. Torch sees no
CUDA here, so each trial's process says so once and trains on the CPU."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kdsearch.train import trial as trial_module
from tests.helpers import write_space
from tests.test_local_cluster import LOCAL_SH, clean_env, parse_env, stop_cluster

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="local.sh and this test need Linux's /proc"),
]

WORKER_GPUS = 2
NO_CUDA_LINE = "kdsearch: this trial was given GPU"
SLACK_S = 1.0  # the most a result takes from the worker to the driver's clock (the epoch rows' time)


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """One `local.sh start 2 --gpus 2` for the module: two workers of 2 CPUs (two trials each) and a
    head with 1 CPU and no GPU (so a task that asked for no GPU could run there); stopped afterwards,
    and whatever is left of its node sessions killed by pid."""
    state = tmp_path_factory.mktemp("gpu-cluster") / "state"
    start = [str(LOCAL_SH), "--dir", str(state), "start", "2", "--gpus", str(WORKER_GPUS)]
    started = subprocess.run(
        [*start, "--worker-cpus", "2", "--head-cpus", "1", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    try:
        assert started.returncode == 0, started.stderr
        assert "2 workers with 2 CPUs and 2 GPUs each" in started.stderr, started.stderr
        yield state, started.stdout.strip(), parse_env((state / "env").read_text())
    finally:
        stop_cluster(state)


def gpu_space(
    folder: Path, teacher: Path, trials: int, cpus: float, gpus: float, concurrent: int | None = None, **student: object
) -> Path:
    """The digits test space with these resources; every trial trains (no budget, no early stopping).
    `concurrent` is search.max_concurrent."""
    folder.mkdir(parents=True, exist_ok=True)
    space = write_space(folder, teacher, trials=trials, epochs=2, max_concurrent=concurrent)
    raw = yaml.safe_load(space.read_text())
    raw["resources"] = {"cpus": cpus, "gpus": gpus}
    raw["budget"] = {"max_gflops": None}
    raw["early_stopping"] = {"enabled": False}
    raw["student"].update(student)
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    return space


def search(space: Path, address: str, auth: dict[str, str], runs: Path, name: str) -> str:
    """`kdsearch search SPACE --address ADDRESS` as a user runs it; returns what it said (stderr)."""
    kdsearch = Path(sys.executable).with_name("kdsearch")
    done = subprocess.run(
        [str(kdsearch), "search", str(space), "--address", address, "--storage", str(runs), "--name", name],
        capture_output=True,
        text=True,
        timeout=240,
        env=clean_env(**auth),
        cwd=runs.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return " ".join(done.stderr.split())  # Rich wraps long lines


def trial_intervals(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial: its node and GPU ids (one of each over its epochs) and an interval [start, end] in
    which it surely ran: its last report reached the driver at its last epoch's row time, at most
    SLACK_S after it left the worker, which had then run for its wall_seconds (Tune's time_total_s)."""
    where = epochs.groupby("trial_id")[["node_id", "gpu_ids"]].nunique()
    assert (where == 1).all().all(), epochs[["trial_id", "epoch", "node_id", "gpu_ids"]]
    last = epochs.groupby("trial_id").agg(
        node_id=("node_id", "first"), gpu_ids=("gpu_ids", "first"), end=("time", "max")
    )
    return last.assign(start=last.end - trials.wall_seconds[last.index], end=last.end - SLACK_S)


def temp_logs(state: Path) -> list[Path]:
    """The logs folders of every node (each node's --temp-dir holds its session's)."""
    dirs = [Path((d / "temp_dir").read_text().strip()) for d in (state / "nodes").glob("*")]
    return [s / "logs" for d in dirs for s in d.glob("session_*") if not s.is_symlink()]  # not session_latest


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows declared GPUs on a machine whose torch sees no CUDA")
def test_trials_share_declared_gpus_train_data_parallel_and_the_cache_runs_on_gpu_nodes(
    gpu_cluster: tuple[Path, str, dict[str, str]], digits_teacher_path: Path, tmp_path: Path
) -> None:
    state, address, auth = gpu_cluster

    # The nodes: the head declares no GPU, each worker WORKER_GPUS (as Ray's state API lists them, from the
    # dashboard local.sh recorded: no driver to start)
    request = urllib.request.Request(
        f"{(state / 'dashboard').read_text().strip()}/api/v0/nodes",
        headers={"Authorization": f"Bearer {(state / 'auth_token').read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        listed = [n for n in json.load(response)["data"]["result"]["result"] if n["state"] == "ALIVE"]
    nodes = [
        {"id": n["node_id"], "cpus": n["resources_total"].get("CPU", 0.0), "gpus": n["resources_total"].get("GPU", 0.0)}
        for n in listed
    ]
    assert sorted((n["cpus"], n["gpus"]) for n in nodes) == [(1.0, 0.0), (2.0, 2.0), (2.0, 2.0)], nodes
    workers = {n["id"] for n in nodes if n["gpus"] > 0}

    # gpus: 0.5 -- four trials of one CPU each, two per worker, packed two on one GPU
    runs = tmp_path / "runs"
    runs.mkdir()
    # (no search.max_concurrent: the driver keeps as many trials pending as the cluster has room for)
    half = gpu_space(tmp_path / "half", digits_teacher_path, trials=4, cpus=1, gpus=0.5)
    said = search(half, address, auth, runs, "half")
    assert said.count("where torch finds no CUDA device: it trains on the CPU") == 1, said[-3000:]
    trials = pd.read_parquet(runs / "half" / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(runs / "half" / "epochs.parquet")
    assert len(trials) == 4 and (trials.status == "completed").all(), trials[["status", "error"]]
    assert set(trials.node_id) <= workers and (trials.gpu == "").all() and (trials.world_size == 1).all()
    assert set(trials.gpu_ids) <= {str(i) for i in range(WORKER_GPUS)}, trials.gpu_ids  # one GPU's id each
    ran = trial_intervals(trials, epochs)
    assert ran[["node_id", "gpu_ids"]].equals(trials.loc[ran.index, ["node_id", "gpu_ids"]])
    shared = [
        (a, b)
        for a, b in itertools.combinations(ran.index, 2)
        if (ran.node_id[a], ran.gpu_ids[a]) == (ran.node_id[b], ran.gpu_ids[b])
        and max(ran.start[a], ran.start[b]) < min(ran.end[a], ran.end[b])
    ]
    assert shared, ran  # two trials at once on one node's one GPU

    # The teacher's cache: computed by a task that held a GPU, on a worker (the head has a CPU but no GPU)
    cached = re.search(r"teacher logits cached once .*? Ray task\(s\) on (.*?) in [\d.]+ s", said)
    assert cached, said[-3000:]
    places = re.findall(r"node ([0-9a-f]{12}) \(GPU (\d+)\)", cached.group(1))
    assert places and {node for node, _ in places} <= {w[:12] for w in workers}, (cached.group(1), workers)

    # gpus: 2 -- one trial in two processes, on both GPUs of one worker; the cache is reused
    two = gpu_space(tmp_path / "two", digits_teacher_path, trials=1, cpus=2, gpus=2, depth=1, patch_size=4)
    said = search(two, address, auth, runs, "two")
    assert "teacher logits: reusing the cache" in said, said[-3000:]
    trials = pd.read_parquet(runs / "two" / "trials.parquet")
    epochs = pd.read_parquet(runs / "two" / "epochs.parquet")
    assert list(trials.status) == ["completed"], trials[["status", "error"]]
    assert list(trials.world_size) == [2]  # the process group's size: it forms only once both ranks joined
    assert list(trials.gpu_ids) == ["0,1"] and set(trials.node_id) <= workers
    assert (epochs.gpu_ids == "0,1").all() and (epochs.node_id == trials.node_id[0]).all()

    # Every trial's process said once that torch sees no CUDA for its GPU, and trained on the CPU
    logs = {log: count for folder in temp_logs(state) for log, count in warned(folder).items()}
    assert logs and set(logs.values()) == {1}, logs
    assert len(logs) == 5, logs  # a fresh worker process per trial on a cluster (run.reuse_on), 4 + 1


def warned(logs: Path) -> dict[Path, int]:
    """The worker logs in one node's logs folder that hold the no-CUDA line, with its count."""
    found = {}
    for log in logs.glob("worker-*.err"):
        count = log.read_text(errors="replace").count(NO_CUDA_LINE)
        if count:
            found[log] = count
    return found


def test_a_process_given_gpus_torch_cannot_see_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """trial_device: the CPU when torch sees no CUDA; one line the first time GPUs were given, none after
    and none when none were given."""
    if torch.cuda.is_available():
        pytest.skip("this machine's torch sees CUDA")
    monkeypatch.setattr(trial_module, "_said_no_cuda", False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    lines: list[str] = []
    assert trial_module.trial_device((), lines.append).type == "cpu" and lines == []
    assert trial_module.trial_device(["1"], lines.append).type == "cpu"
    assert trial_module.trial_device(["1"], lines.append).type == "cpu"
    assert len(lines) == 1 and "GPU 1 (CUDA_VISIBLE_DEVICES=1)" in lines[0] and "training on the CPU" in lines[0]


def test_trial_slots_count_what_the_cluster_fits() -> None:
    from kdsearch.search.ray_session import trial_slots
    from kdsearch.space.search_space import Resources

    cluster = {"CPU": 5.0, "GPU": 4.0}  # the module's cluster: a 1-CPU head, two workers of 2 CPUs and 2 GPUs
    assert trial_slots(Resources(cpus=1, gpus=0.5), cluster) == 5  # the CPUs bind before the GPUs (8)
    assert trial_slots(Resources(cpus=1, gpus=2), cluster) == 2
    assert trial_slots(Resources(cpus=0.5, gpus=0), cluster) == 10
    assert trial_slots(Resources(cpus=1, gpus=1), {"CPU": 8.0}) == 1  # GPU nodes not up yet: one pending
