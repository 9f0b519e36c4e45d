"""`search.strategy: oneshot`: the supernet, the screening and the training of the kept students,
in one run that resumes in each stage (kdsearch.search.oneshot, kdsearch.search.screening)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths, open_run
from kdsearch.search.screening import Screening, kept_order, read_screening, student_key
from kdsearch.space.file import load_space
from kdsearch.storage import Storage
from tests.helpers import run_cli
from tests.test_search_faults import descendants, kill_all

SPACE = """
name: oneshot_digits
data: {{name: digits, img_size: 16}}
teacher: {{model: kdsearch/digits_cnn, checkpoint: {teacher}}}
student:
  embed_dim: [16, 32]
  depth: [1, 2, 3]
  num_heads: 2
  mlp_ratio: [1.0, 2.0]
  patch_size: [4, 8]  # 16 or 4 tokens: students as cheap as at 8 px, with the session's teacher
  pos_embed: [learned, sincos, relpos, rope, cpe, none]
  distill_token: [false, true]
recipe: {{alpha: {{low: 0.0, high: 1.0}}, temperature: 4.0}}
train: {{epochs: 2, batch_size: 64, lr: 2.0e-3, warmup_epochs: 1}}
budget: {{max_gflops: {gflops}}}
resources: {{cpus: 1}}
objectives: {{val_acc: max, {cost}: min}}
search: {{trials: 3, sampler: random, seed: 0, max_concurrent: 1, strategy: oneshot, supernet_epochs: {epochs},
          screen_subnets: {subnets}, screen_sampler: nsga2}}
"""


def write_space(tmp: Path, teacher: Path, epochs: int = 2, subnets: int = 30, cost: str = "flops") -> Path:
    path = tmp / "oneshot.yaml"
    path.write_text(SPACE.format(teacher=teacher, epochs=epochs, subnets=subnets, gflops=0.0004, cost=cost))
    return path


def parquet(store: Storage, rel: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(store.read_bytes(rel))).to_pylist()


def test_kept_students_are_the_front_then_spread_along_the_cost() -> None:
    objectives = [("val_acc", "max"), ("flops", "min")]
    rows = [
        {"subnet_id": i, "feasible": True, "inherited_val_acc": acc, "flops": flops}
        for i, (acc, flops) in enumerate([(0.9, 10), (0.8, 5), (0.5, 1), (0.85, 10), (0.7, 5), (0.4, 1), (0.3, 2)])
    ]
    rows.append({"subnet_id": 7, "feasible": False, "inherited_val_acc": None, "flops": 0.5})
    kept = kept_order(rows, objectives, 5)
    assert kept.ranks == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 2, 6: 3}
    assert kept.order[:3] == [0, 1, 2]  # the front, best inherited accuracy first
    assert sorted(kept.order[3:]) == [3, 5]  # rank 2 does not fit whole: its two ends along flops
    assert kept_order(rows, objectives, 2).order == [0, 2]  # the front spread: its cheapest and its costliest


def test_the_screening_asks_each_student_once_until_the_space_is_spent(
    digits_teacher_path: Path, tmp_path: Path
) -> None:
    """A sampler settled in a small space proposes copies of its elite: each copy fails and a
    random unseen student is asked in its place, so the screening reaches every feasible student
    and the study holds about one trial per student (each trial costs every later ask a scan)."""
    space = load_space(write_space(tmp_path, digits_teacher_path, subnets=1000))
    screening = Screening(space, Storage.open(tmp_path / "run"), 0, time.time())
    limit = space.num_architectures()
    while batch := screening.ask(16, 1000, limit):  # the score favours wide, deep students: NSGA-II settles
        screening.scored_batch(batch, [(r["student.embed_dim"] * r["student.depth"]) / 100 for r in batch])
    keys = [student_key(r) for r in screening.rows]
    assert len(keys) == len(set(keys)) == limit and not screening.stalled
    feasible = [r for r in screening.rows if r["feasible"]]
    assert 0 < len(feasible) < limit and all(r["inherited_val_acc"] is not None for r in feasible)
    assert len(screening.study.trials) < 2 * limit


def test_a_measured_objective_with_oneshot_is_one_line(
    digits_teacher_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = write_space(tmp_path, digits_teacher_path, cost="latency_ms")
    assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "search.strategy: oneshot" in err and "latency_ms is measured" in err


def _stages(run: Path) -> dict:
    try:
        return json.loads((run / "oneshot" / "stages.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill_when(cmd: list[str], ready, log: Path, sig: signal.Signals = signal.SIGKILL) -> int:
    """Start a driver, send it `sig` once `ready()` holds, and SIGKILL every process it started
    (by pid) once it has ended; returns its exit status."""
    with open(log, "a") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        helpers: list[int] = []
        try:
            deadline = time.monotonic() + 240
            while not ready():
                assert driver.poll() is None, f"the driver ended before the kill:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"waited 240 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
            helpers = descendants(driver.pid)
            os.kill(driver.pid, sig)
            return driver.wait(timeout=60)
        finally:
            kill_all(helpers + descendants(driver.pid))


def test_a_driver_killed_in_each_stage_resumes_without_redoing_work(digits_teacher_path: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, digits_teacher_path, epochs=3, subnets=120)
    kdsearch = Path(sys.executable).with_name("kdsearch")
    cmd = [str(kdsearch), "search", str(space), "--storage", str(tmp_path / "runs"), "--name", "killed"]
    run, log = tmp_path / "runs" / "killed", tmp_path / "driver.log"
    store = Storage.open(run)

    # 1. in the supernet's training, after its first epoch was saved
    _kill_when(cmd, lambda: _stages(run).get("supernet", {}).get("epochs", 0) >= 1, log)
    first = _stages(run)["supernet"]
    assert first["ended"] is None, "the kill came after the supernet's training"
    epochs_before = {r["epoch"]: r["seconds"] for r in parquet(store, "oneshot/supernet_epochs.parquet")}

    # 2. in the screening, once a batch is recorded: Ctrl-C (SIGINT), one line and the shell's 130
    interrupted = len(log.read_text())
    status = _kill_when(
        cmd + ["--resume"], lambda: _stages(run).get("screening", {}).get("scored", 0) >= 1, log, signal.SIGINT
    )
    said = log.read_text()[interrupted:]
    assert status == 130 and "kdsearch: interrupted (Ctrl-C)" in said and "Traceback" not in said, said[-3000:]
    start = int(re.search(r"supernet: 3 epochs, after epoch (\d+)", log.read_text()).group(1))
    assert start >= first["epochs"] - 1  # the last epoch saved (its report may have come before its save)
    second = _stages(run)
    assert second["supernet"]["ended"] and second["screening"]["ended"] is None, "the kill came after the screening"
    supernet_written = (run / "oneshot" / "supernet.pt").stat().st_mtime_ns
    epochs_after = {r["epoch"]: r["seconds"] for r in parquet(store, "oneshot/supernet_epochs.parquet")}
    assert sorted(epochs_after) == [1, 2, 3]
    assert all(
        epochs_after[k] == epochs_before[k] for k in range(1, start + 1)
    )  # the epochs saved were not trained again
    screened = {r["subnet_id"]: r for r in read_screening(store)}

    # 3. in the training, once a trial is recorded
    _kill_when(
        cmd + ["--resume"], lambda: len(open_run(run).rows(RunPaths.TRIALS)) >= 1 if run.exists() else False, log
    )
    recorded = open_run(run).rows(RunPaths.TRIALS)
    assert 1 <= len(recorded) < 3, "the kill came after the training"
    assert "supernet: trained before (3 epochs)" in log.read_text()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "screening: done before" in resumed.stderr
    assert (run / "oneshot" / "supernet.pt").stat().st_mtime_ns == supernet_written  # never trained again
    rows = {r["subnet_id"]: r for r in read_screening(store)}
    assert sum(r["inherited_val_acc"] is not None for r in rows.values()) == 120
    for i, row in screened.items():  # what was scored before the kill was not scored again
        assert rows[i]["inherited_val_acc"] == row["inherited_val_acc"] and rows[i]["scored_at"] == row["scored_at"]
    assert {t["trial_id"] for t in recorded} <= {t["trial_id"] for t in open_run(run).rows(RunPaths.TRIALS)}
    assert f"training: the {3 - len(recorded)} screened students left run first" in resumed.stderr
    assert_a_whole_oneshot_run(store, subnets=120)


def assert_a_whole_oneshot_run(store: Storage, subnets: int) -> None:
    """The three stages' files say each ran to its end, and the front holds only trained
    students, each a kept row of the screening."""
    stages = json.loads(store.read_text("oneshot/stages.json"))
    assert stages["supernet"]["epochs"] == stages["supernet"]["of"] == 3 and stages["supernet"]["ended"]
    assert stages["screening"]["scored"] == stages["screening"]["of"] == subnets and stages["screening"]["ended"]
    assert [r["epoch"] for r in parquet(store, "oneshot/supernet_epochs.parquet")] == [1, 2, 3]

    rows = parquet(store, "oneshot/screening.parquet")  # one whole file once the screening ended
    assert not store.exists("oneshot/screening.parts")
    assert len({r["subnet_id"] for r in rows}) == len(rows)
    assert len({student_key(r) for r in rows}) == len(rows)  # each student scored once
    scored = [r for r in rows if r["inherited_val_acc"] is not None]
    assert len(scored) == subnets and all(r["feasible"] and 0 <= r["inherited_val_acc"] <= 1 for r in scored)
    assert any(not r["feasible"] for r in rows)  # the budget is a constraint of the screening
    assert all(r["flops"] > 0 and r["scored_at"] >= 0 and "student.pos_embed" in r for r in rows)
    assert min(r["rank"] for r in scored) == 1 and all(r["rank"] == 0 for r in rows if not r["feasible"])
    kept = sorted((r for r in rows if r["kept"] >= 0), key=lambda r: r["kept"])
    assert [r["kept"] for r in kept] == [0, 1, 2] and all(r["feasible"] for r in kept)

    run = RunPaths(store)
    trials = run.rows(RunPaths.TRIALS)
    assert len(trials) == 3 and len({t["trial_id"] for t in trials}) == 3
    assert {student_key(t) for t in trials} == {student_key(r) for r in kept}  # every trial is a kept student
    front = front_rows(trials, run.meta()["objectives"])
    assert front and all(t["status"] == "completed" for t in front)
    assert {student_key(t) for t in front} <= {student_key(r) for r in kept}
