"""Faults: a Ray node lost mid-trial (several real nodes on one machine; a local.sh worker SIGKILLed), and what a resume
after a driver's SIGKILL meets (the kill itself: tests/test_storage_s3.py, resumed elsewhere)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from kdsearch.search.run import run_search
from tests.helpers import run_dir, train_every_trial, write_space

CONFIG_COLUMNS = [
    "student.embed_dim",
    "student.depth",
    "student.num_heads",
    "student.patch_size",
    "student.pos_embed",
    "student.distill_token",
    "recipe.alpha",
    "recipe.temperature",
]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def kill_driver_when(cmd: list[str], ready, what: str, log: Path, cwd: Path | None = None) -> None:
    """Start a `kdsearch search` driver, SIGKILL it once `ready()` holds, and kill every process
    it had started (Ray's helpers can outlive a killed driver), by pid."""
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        helpers: list[int] = []
        try:
            wait_for(ready, 240, what)
            helpers = descendants(driver.pid)
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            kill_all(helpers + descendants(driver.pid))


def epochs_seen(path: Path) -> int:
    try:
        return len(pd.read_parquet(path)) if path.exists() else 0
    except Exception:  # mid-rename on some filesystems: try again
        return 0


def running_on(run: str | Path, node_id: str, epochs_left: int) -> str | None:
    """A trial that is training on node `node_id` now: its latest epoch ran there, it has at least
    `epochs_left` epochs to go, and it has no row in trials.parquet (the live tables' parts
    included). None while there is none."""
    from kdsearch.results.tables import RunPaths, open_run

    try:
        paths = open_run(run)
        ended = {r["trial_id"] for r in paths.rows(RunPaths.TRIALS)}
        latest = {r["trial_id"]: r for r in paths.rows(RunPaths.EPOCHS)}  # by trial, then epoch: the last wins
    except Exception:  # not started yet, or a part merged away while it was read: the next poll reads again
        return None
    for tid, row in latest.items():
        if tid not in ended and row["node_id"] == node_id and row["epochs_total"] - row["epoch"] >= epochs_left:
            return tid
    return None


def test_node_lost_mid_trial_is_retried_elsewhere(digits_teacher_path: Path, tmp_path: Path) -> None:
    """The worker node a trial is training on is removed (the trial's epochs say where it runs):
    the trial runs again on the other node and the search ends with no trial failed."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    # two trials per worker: once one is lost, the other trains two at a time, one per core of a 2-core machine
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    lost = workers[0].node_id
    # max_failures 0: a lost node is no failure of the trial's, so its trials run again all the same
    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=4, epochs=8, seed=11), max_failures=0)
    run = tmp_path / "runs" / "digits_search"
    victim: list[str] = []

    def remove_a_worker() -> None:
        # the recorder writes epochs every 2 s: 4 epochs left leave the trial seconds on the node
        deadline = time.monotonic() + 240
        while not victim and time.monotonic() < deadline:
            if tid := running_on(run, lost, 4):
                cluster.remove_node(workers[0])
                victim.append(tid)
            time.sleep(0.2)

    killer = threading.Thread(target=remove_a_worker, daemon=True)
    killer.start()
    try:
        result = run_search(space, storage=tmp_path / "runs", address=cluster.address, say=lambda s: None)
    finally:
        killer.join(timeout=5)
        cluster.shutdown()
    assert victim, "no trial was seen training on the node before the search ended"
    trials = pd.read_parquet(run_dir(result) / "trials.parquet").set_index("trial_id")
    assert len(trials) == 4  # every trial accounted for, once
    assert "failed" not in set(trials.status), trials[["status", "error"]]
    retried = trials.loc[victim[0]]
    assert retried.status == "completed" and retried.retries >= 1, retried
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    curve = epochs[epochs.trial_id == victim[0]].sort_values("epoch")
    assert curve.epoch.tolist() == list(range(1, 9))  # one clean curve: the retry's epochs replace the lost ones
    assert curve.node_id.iloc[-1] == workers[1].node_id  # finished on the node that is left


def test_trials_missing_from_the_saved_state_are_reconciled(small_run, tmp_path: Path) -> None:
    """What a resume after SIGKILL meets, made deterministic: trials.parquet holds trials that
    Ray's saved searcher state never saw. A seeded random sampler proposes the same configs
    again; they are told their recorded outcome instead of running twice, and they count
    toward the total."""
    import optuna

    first, space = small_run
    done = pd.read_parquet(run_dir(first) / "trials.parquet").sort_values("optuna_trial")
    seeded = done.iloc[:3]
    run = tmp_path / "runs" / "digits_search"
    run.mkdir(parents=True)
    seeded.to_parquet(run / "trials.parquet", index=False)
    result = run_search(space, storage=tmp_path / "runs", trials=5, say=lambda s: None)
    after = pd.read_parquet(run_dir(result) / "trials.parquet")
    assert len(after) == 5 and after.trial_id.is_unique
    assert set(seeded.trial_id) <= set(after.trial_id)
    assert not after.duplicated(subset=CONFIG_COLUMNS).any()
    new = after[~after.trial_id.isin(seeded.trial_id)].sort_values("optuna_trial")
    # the sampler went on where the recorded trials left it: the next two configs of the first run
    for (_, got), (_, want) in zip(new.iterrows(), done.iloc[3:5].iterrows()):
        assert [got[c] for c in CONFIG_COLUMNS] == [want[c] for c in CONFIG_COLUMNS]
    study = optuna.load_study(study_name="kdsearch", storage=f"sqlite:///{run_dir(result) / 'study.db'}")
    states = [t.state.name for t in study.trials[:3]]
    expected = {"completed": "COMPLETE", "infeasible": "COMPLETE", "stopped_early": "PRUNED", "failed": "FAIL"}
    assert states == [expected[s] for s in seeded.status]


@pytest.mark.timeout(420)
def test_a_sigkilled_worker_loses_no_trial(digits_teacher_path: Path, tmp_path: Path) -> None:
    """A `local.sh` worker node (its `ray start`, raylet and workers: its whole session) killed
    with SIGKILL while a trial trains on it, the run in a moto bucket: the search finishes with
    every trial once and none failed."""
    from tests.s3 import environment, make_bucket, s3_server
    from tests.test_local_cluster import LOCAL_SH, clean_env, parse_env, stop_cluster

    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=4, epochs=8, seed=5), max_failures=0)
    state, runs = tmp_path / "state", "s3://node-loss/runs"
    with s3_server(tmp_path / "moto.log") as s3:
        make_bucket(s3, "node-loss")
        # two trials per worker: once one is killed, the other trains two at a time (one per core of a 2-core machine)
        started = subprocess.run(
            [str(LOCAL_SH), "--dir", str(state), "start", "2", "--worker-cpus", "2", "--timeout", "90"],
            capture_output=True,
            text=True,
            timeout=150,
            env=clean_env(**s3),
        )
        try:
            assert started.returncode == 0, started.stderr
            env = clean_env(**s3, **parse_env((state / "env").read_text()))
            kdsearch = Path(sys.executable).with_name("kdsearch")
            cmd = [str(kdsearch), "search", str(space), "--address", started.stdout.strip(), "--storage", runs]
            with open(tmp_path / "driver.log", "w") as log:
                driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
                killed = kill_a_worker_under_a_trial(state, f"{runs}/digits_search", s3, env)
                code = driver.wait(timeout=360)
            assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
            with environment(s3):
                from kdsearch.results.tables import RunPaths, open_run

                trials = pd.DataFrame(open_run(f"{runs}/digits_search").rows(RunPaths.TRIALS))
            assert len(trials) == 4 and trials.trial_id.is_unique  # every trial once
            assert (trials.status == "completed").all(), trials[["trial_id", "status", "error", "retries"]]
            assert trials.set_index("trial_id").loc[killed, "retries"] >= 1  # it ran again, on the node left
        finally:
            stop_cluster(state)


def kill_a_worker_under_a_trial(state: Path, run: str, s3: dict[str, str], env: dict[str, str]) -> str:
    """SIGKILL every process of the local.sh worker a trial is training on (the trial's latest
    epoch ran there, 4 epochs to go); returns that trial's id."""
    from tests.s3 import environment
    from tests.test_local_cluster import NODES_DRIVER, processes_in_sessions

    address = (state / "address").read_text().strip()
    listed = subprocess.run([sys.executable, "-c", NODES_DRIVER, address], env=env, capture_output=True, text=True)
    nodes = json.loads(listed.stdout)
    workers = {}  # local.sh's node name -> Ray's node id, matched by the node's temp dir
    for name in ("worker-1", "worker-2"):
        temp = (state / "nodes" / name / "temp_dir").read_text().strip()
        workers[name] = next(n["id"] for n in nodes if n["socket"].startswith(temp + "/"))
    deadline = time.monotonic() + 240
    with environment(s3):
        while time.monotonic() < deadline:
            for name, node_id in workers.items():
                if tid := running_on(run, node_id, 4):
                    leader = int((state / "nodes" / name / "pid").read_text())
                    kill_all(list(processes_in_sessions({leader})))
                    return tid
            time.sleep(0.3)
    raise TimeoutError("no trial was seen training on a worker")
