"""Faults a search survives or stops on cleanly: a trial that diverges, runs out of memory or
passes train.max_minutes (failed with its reason, not retried, the search goes on); storage that
fills up or turns read-only mid-run (the search stops with one line, the tables are the last whole ones, --resume
continues); tables that are torn (one line on every command that reads them)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kdsearch.space import objectives
from kdsearch.space.objectives import Objective
from kdsearch.train.faults import TimeLimit, TrialOutOfMemory, TrialTimedOut, Watchdog
from tests.helpers import missing, one_ray, run_cli, run_dir, search_stopped_by_storage, write_space
from tests.test_search_faults import epochs_seen, wait_for

STUDENT = {
    "student.embed_dim": 32,
    "student.depth": 1,
    "student.num_heads": 2,
    "student.patch_size": 4,
    "student.pos_embed": "learned",
    "student.distill_token": False,
}
OOM_ALPHA, SLOW_ALPHA, HUNG_ALPHA = 0.25, 0.75, 0.125  # the configs the hook below makes run out of memory, stall, hang


# --------------------------------------------------------------------------- the pieces


def test_out_of_memory_is_one_line() -> None:
    error = torch.cuda.OutOfMemoryError(  # constructible without a GPU: the text torch's allocator raises
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB\n"
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    fault = TrialOutOfMemory.of(error, 3)
    assert fault.line() == (
        "TrialOutOfMemory: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB. "
        "GPU 0 has a total capacity of 79.15 GiB) at epoch 3"
    )
    assert TrialOutOfMemory.of(MemoryError(), 1).line() == "TrialOutOfMemory: out of memory (host memory) at epoch 1"


def test_time_limit_and_watchdog() -> None:
    now = [0.0]
    limit = TimeLimit(0.5, clock=lambda: now[0])
    now[0] = 29.0
    limit.check(1)  # 0.48 min: within
    now[0] = 31.0
    with pytest.raises(TrialTimedOut, match=r"trained 0\.52 min, exceeded train\.max_minutes=0\.5 after epoch 2"):
        limit.check(2)
    TimeLimit(None, clock=lambda: now[0]).check(9)  # no limit

    hung: list[str] = []
    with Watchdog(0.3, hung.append, "stuck"):
        time.sleep(1.0)  # a C call: no batch boundary comes
    assert hung == ["stuck"]
    with Watchdog(5.0, hung.append, "never"):
        pass
    time.sleep(0.1)
    assert hung == ["stuck"]


def test_a_bad_hang_grace_is_one_line(
    digits_teacher_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from kdsearch.train.faults import HANG_GRACE, hang_grace_minutes

    monkeypatch.delenv(HANG_GRACE, raising=False)
    assert hang_grace_minutes() == 2.0
    monkeypatch.setenv(HANG_GRACE, "0.5")
    assert hang_grace_minutes() == 0.5
    space = write_space(tmp_path, digits_teacher_path)
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(HANG_GRACE, bad)
        assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert f"{HANG_GRACE}={bad}: not a number of minutes >= 0 (unset: 2)" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists(), "refused before anything was written"


# --------------------------------------------------------------------------- a trial's own faults, in a search


@pytest.fixture()
def fault_hook():
    """A measured objective that is a test's hook into real trials (the worker runs it after
    every epoch): the OOM config raises torch's out-of-memory error at epoch 1, the slow one
    stalls 1.5 s there, so its max_minutes (0.02 = 1.2 s) has passed at epoch 2's first batch,
    and the hung one sleeps there for good (a call with no batch boundary: only the watchdog
    can end it)."""

    def measure(ctx: objectives.MeasureContext) -> float:
        import time

        import torch

        if ctx.spec.recipe.alpha == OOM_ALPHA and ctx.epoch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nadvice")
        if ctx.spec.recipe.alpha == SLOW_ALPHA and ctx.epoch == 1:
            time.sleep(1.5)
        if ctx.spec.recipe.alpha == HUNG_ALPHA and ctx.epoch == 1:
            time.sleep(600.0)
        return 1.0

    yield objectives.register(Objective("fault_hook", "min", "", "a test's hook", measure=measure))
    del objectives.OBJECTIVES["fault_hook"]


def test_diverged_oom_timed_out_and_hung_trials_fail_and_the_search_goes_on(
    fault_hook, digits_teacher_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdsearch.search.run import run_search
    from kdsearch.train.faults import HANG_GRACE

    # the hung trial: max_minutes 0.1 (6 s, well past its first epoch) + 0.08 of grace (set before
    # the search starts its Ray, whose workers inherit it); not retried (max_failures 0), as it
    # would hang again. The grace (4.8 s) holds the slow trial's first epoch, its 1.5 s stall and
    # one batch on a loaded machine: its batch-boundary check ends it, never the watchdog
    monkeypatch.setenv(HANG_GRACE, "0.08")
    space_file = write_space(tmp_path, digits_teacher_path, trials=5, epochs=2, max_concurrent=2)
    raw = yaml.safe_load(space_file.read_text())
    raw["train"].update(lr=[2.0e-3, 1.0e6], warmup_epochs=0, max_minutes=[0.02, 0.1, 10.0])
    raw["search"]["max_failures"] = 0
    raw["objectives"] = {"val_acc": "max", "flops": "min", "fault_hook": "min"}
    raw["hypervolume"] = {"reference": {"fault_hook": 2.0}}
    ok = {**STUDENT, "train.lr": 2.0e-3, "train.max_minutes": 10.0}
    raw["search"]["enqueue"] = [
        {**ok, "train.lr": 1.0e6, "recipe.alpha": 0.5},  # diverges in epoch 1
        {**ok, "recipe.alpha": OOM_ALPHA},
        {**ok, "train.max_minutes": 0.02, "recipe.alpha": SLOW_ALPHA},
        {**ok, "train.max_minutes": 0.1, "recipe.alpha": HUNG_ALPHA},
        {**ok, "recipe.alpha": 0.5},  # the healthy one
    ]
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = run_search(space_file, storage=tmp_path / "runs", say=lambda s: None)
    trials = pd.read_parquet(run_dir(result) / "trials.parquet").set_index("optuna_trial").sort_index()
    assert len(trials) == 5 and not result.interrupted
    assert list(trials.status) == ["failed"] * 4 + ["completed"], trials[["status", "error"]]
    errors = list(trials.error)
    assert re.fullmatch(r"TrialDiverged: training diverged: loss nan at epoch 1, step \d+", errors[0]), errors[0]
    assert errors[1] == "TrialOutOfMemory: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB) at epoch 1"
    assert re.fullmatch(
        r"TrialTimedOut: trained \d+\.\d\d min, exceeded train\.max_minutes=0\.02 after epoch [01]", errors[2]
    ), errors[2]
    assert errors[3] == (
        "TrialTimedOut: still running 0.18 min after its start, past train.max_minutes=0.1 plus 0.08 min "
        "of grace, with no batch boundary reached (stuck in a call); its worker was ended"
    )
    assert pd.isna(trials.error.iloc[4]) and trials.val_acc.iloc[4] > 0  # trained and measured
    assert (trials.retries == 0).all()  # a trial's own fault is not retried: it would fail the same way
    assert trials.val_acc.iloc[:4].isna().all()  # nothing measured is recorded for a failed trial


def test_a_search_whose_every_trial_failed_exits_1_naming_the_failure(
    digits_teacher_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every trial diverges: the search says so in one line with the most common failure, and
    its exit code is 1 (a failed run, not bad input); nothing says "yet" of a finished search."""
    space_file = write_space(tmp_path, digits_teacher_path, trials=2, epochs=1, max_concurrent=2)
    raw = yaml.safe_load(space_file.read_text())
    raw["train"].update(lr=1.0e6, warmup_epochs=0)
    raw["budget"] = {"max_gflops": None}
    space_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    code = run_cli(["search", str(space_file), "--storage", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"kdsearch: error: search \S+digits_search: no trial trained \(2 failed\); the most common failure "
        r"\(2 of 2\): TrialDiverged: training diverged: loss nan at epoch 1, step \d+",
        line,
    ), line
    assert "no trial has completed in this search" in out and "yet" not in out


def test_untrained_summary_counts_each_ending_and_names_the_commonest_failure() -> None:
    from kdsearch.results.outcomes import untrained_summary

    rows = [
        {"status": "failed", "error": "KdsearchError: data.root: /data does not exist on node a\ndetail"},
        {"status": "failed", "error": "KdsearchError: data.root: /data does not exist on node a"},
        {"status": "failed", "error": "TrialDiverged: training diverged"},
        {"status": "infeasible", "error": None},
    ]
    assert untrained_summary(rows) == (
        "no trial trained (1 infeasible, 3 failed); the most common failure (2 of 4): "
        "KdsearchError: data.root: /data does not exist on node a"
    )
    assert untrained_summary(rows[3:]) == "no trial trained: all 1 were over the budget (1 infeasible)"
    assert untrained_summary([*rows, {"status": "stopped_early", "error": None}]) is None
    assert untrained_summary([]) is None


# --------------------------------------------------------------------------- torn tables


@pytest.fixture()
def torn_run(small_run, tmp_path: Path) -> Path:
    first, _ = small_run
    run = tmp_path / "digits_search"
    shutil.copytree(run_dir(first), run)
    return run


@pytest.mark.parametrize("name", ["trials.parquet", "epochs.parquet", "run.json"])
def test_a_torn_table_is_one_line_everywhere(torn_run: Path, name: str, capsys) -> None:
    path = torn_run / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a write cut in the middle
    kind = "readable JSON" if name == "run.json" else "a readable Parquet table"
    for command in (["status", str(torn_run)], ["pareto", str(torn_run)], ["report", str(torn_run)]):
        capsys.readouterr()
        assert run_cli(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"kdsearch: error: {path}: is not {kind} (truncated or corrupt: "), (command, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_resume_of_a_torn_run_is_one_line(small_run, torn_run: Path, capsys) -> None:
    _, space = small_run
    path = torn_run / "trials.parquet"
    path.write_bytes(path.read_bytes()[:100])
    command = ["search", str(space), "--storage", str(torn_run.parent), "--name", torn_run.name, "--resume"]
    assert run_cli(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdsearch: error: {path}: is not a readable Parquet table (truncated or corrupt: "), err
    assert len(err.splitlines()) == 1


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_filesystem(where: Path, megabytes: int):
    """A tmpfs of its own at `where` (root may mount one; elsewhere the test skips, and fails in CI)."""
    where.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> Path:
    """Take every free byte of the filesystem at `where`; the file's path (delete it to free them)."""
    filler = where / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    return filler


def test_a_full_disk_or_a_read_only_one_stops_the_search_whole_and_resume_continues(
    digits_teacher_path: Path, tmp_path: Path, capfd
) -> None:
    """The disk fills up mid-run; resumed, it turns read-only mid-run (a remount: root writes
    to a read-only mode bit anyway); resumed again with room, the search finishes. Each stop is
    one line with the tables whole, and every trial is accounted for once."""
    from kdsearch.results.tables import RunPaths
    from kdsearch.search.run import run_search

    space = write_space(tmp_path, digits_teacher_path, trials=6, epochs=2, max_concurrent=1)
    with small_filesystem(tmp_path / "disk", 64) as disk, one_ray():  # one Ray for the three searches
        runs = disk / "runs"
        trials_file = runs / "digits_search" / "trials.parquet"
        run = RunPaths.at(runs / "digits_search")
        filled: list[Path] = []

        def fill_after_one() -> None:
            wait_for(lambda: epochs_seen(trials_file) >= 1, 240, "a trial")
            filled.append(fill(disk))

        line = search_stopped_by_storage(space, runs, fill_after_one)
        assert "No space left on device" in line, line
        assert "Traceback" not in capfd.readouterr().err
        before = pd.read_parquet(trials_file)  # whole: it reads back
        assert 1 <= len(before) < 6
        assert not list(trials_file.parent.glob(".*.tmp")), "a partial write was left behind"

        filled[0].unlink()  # the disk has room again

        def read_only_after_one_more() -> None:
            wait_for(lambda: len(run.rows(RunPaths.TRIALS)) > len(before), 240, "one more trial")
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        try:
            line = search_stopped_by_storage(space, runs, read_only_after_one_more, resume=True)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=False)
        assert "Read-only file system" in line, line
        assert "Traceback" not in capfd.readouterr().err
        pd.read_parquet(trials_file)  # still whole; a read-only disk kept the end's compaction
        middle = pd.DataFrame(run.rows(RunPaths.TRIALS))  # out, so the newer rows are in parts
        assert len(before) < len(middle) < 6 and middle.trial_id.is_unique

        result = run_search(space, storage=runs, resume=True, say=lambda s: None)
        after = pd.read_parquet(trials_file)
        assert len(after) == 6 and after.trial_id.is_unique and not result.interrupted
        kept = after.set_index("trial_id").loc[middle.trial_id]
        assert (kept.status.values == middle.status.values).all()
