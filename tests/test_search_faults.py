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


def test_node_lost_mid_trial_is_retried_elsewhere(digits_teacher_path: Path, tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    space = write_space(tmp_path, digits_teacher_path, trials=5, epochs=8, seed=11)
    epochs_file = tmp_path / "runs" / "digits_search" / "epochs.parquet"
    removed: list[float] = []

    def remove_a_worker() -> None:
        wait_for(lambda: epochs_seen(epochs_file) >= 2, 180, "a trial to be under way")
        cluster.remove_node(workers[0])
        removed.append(time.monotonic())

    killer = threading.Thread(target=remove_a_worker, daemon=True)
    killer.start()
    try:
        result = run_search(space, storage=tmp_path / "runs", address=cluster.address, say=lambda s: None)
    finally:
        killer.join(timeout=5)
        cluster.shutdown()
    assert removed, "the worker node was never removed"
    trials = pd.read_parquet(run_dir(result) / "trials.parquet")
    assert len(trials) == 5 and trials.trial_id.is_unique  # every trial accounted for
    assert "failed" not in set(trials.status), trials[["status", "error"]]
    assert trials.retries.sum() >= 1  # the trial on the lost node ran again on the other
    retried = trials[trials.retries > 0].iloc[0]
    epochs = pd.read_parquet(run_dir(result) / "epochs.parquet")
    curve = epochs[epochs.trial_id == retried.trial_id].epoch.tolist()
    assert curve == list(range(1, retried.epochs + 1))  # one clean curve: the retry's, from epoch 1


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
