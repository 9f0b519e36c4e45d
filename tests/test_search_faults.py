"""Faults: a Ray node lost mid-trial (several real nodes on one machine), and what a resume
after a driver's SIGKILL meets (the kill itself: tests/test_storage_s3.py, resumed elsewhere)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import yaml

from kdsearch.search.run import run_search
from tests.helpers import run_dir, write_space

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


def running_on(run: Path, node_id: str, epochs_left: int) -> str | None:
    """A trial that is training on node `node_id` now: its latest epoch ran there, it has at least
    `epochs_left` epochs to go, and it has no row in trials.parquet (the live tables' parts
    included). None while there is none."""
    from kdsearch.results.tables import RunPaths, open_run

    if not (run / RunPaths.META).exists():
        return None
    try:
        paths = open_run(run)
        ended = {r["trial_id"] for r in paths.rows(RunPaths.TRIALS)}
        latest = {r["trial_id"]: r for r in paths.rows(RunPaths.EPOCHS)}  # by trial, then epoch: the last wins
    except Exception:  # a part merged away while it was read: the next poll reads again
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
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    lost = workers[0].node_id
    space = write_space(tmp_path, digits_teacher_path, trials=4, epochs=8, seed=11)
    raw = yaml.safe_load(space.read_text())
    raw["budget"] = {"max_gflops": None}  # every trial trains
    raw["early_stopping"] = {"enabled": False}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
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
