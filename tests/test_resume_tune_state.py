"""`kdsearch search --resume` continues a run from its recorded trials, whatever Ray Tune's saved
state holds (here torn: the storage failed while Tune wrote it, or naming a searcher class this
kdsearch lacks: a run made with another version): one line, and a new experiment started from
the recorded trials; with no Tune state at all (the driver died before Tune's first save) it says
so in one line and exits 2. From a run stopped by Ctrl-C with trials left to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kdsearch.results.tables import RunPaths
from tests.helpers import interrupt_search, run_cli, train_every_trial, write_space

TOTAL = 4


@pytest.fixture(scope="module")
def stopped(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A run of TOTAL trials stopped by Ctrl-C after its first: (space, storage, trials recorded)."""
    tmp = tmp_path_factory.mktemp("stopped")
    space = train_every_trial(write_space(tmp, digits_teacher_path, trials=TOTAL, epochs=1, max_concurrent=1))
    storage = tmp / "runs"
    run = RunPaths.at(storage / "r")
    _, err = interrupt_search(["search", str(space), "--storage", str(storage), "--name", "r"], run)
    finished = len(run.rows(RunPaths.TRIALS))
    assert 1 <= finished < TOTAL and f"stopped with {finished} of {TOTAL} trials finished" in err, err
    return space, storage, finished


def copy_of(stopped: tuple[Path, Path, int], tmp_path: Path) -> Path:
    """The stopped run's storage (the run and the teacher-logit cache), copied: each test breaks its own."""
    storage = tmp_path / "runs"
    shutil.copytree(stopped[1], storage)
    return storage


def test_a_resume_starts_from_the_recorded_trials_whatever_tunes_state_holds(
    stopped: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space, _, finished = stopped
    storage = copy_of(stopped, tmp_path)
    run = storage / "r"
    (state,) = (run / RunPaths.TUNE).glob("experiment_state-*.json")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # the storage failed mid-write
    tuner = run / RunPaths.TUNE / "tuner.pkl"
    tuner.write_bytes(tuner.read_bytes().replace(b"KdsearchSearcher", b"KdsearchSearchex"))  # a class gone
    before = pd.read_parquet(run / RunPaths.TRIALS).set_index("trial_id")

    assert run_cli(["search", str(space), "--storage", str(storage), "--name", "r", "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps a long line at its width
    said = f"resuming {run}: a new experiment starts from its {finished} recorded trials"
    assert err.count(said) == 1, err
    after = pd.read_parquet(run / RunPaths.TRIALS).set_index("trial_id")
    assert len(after) == TOTAL and after.index.is_unique  # the run's own total, every trial once
    assert (after.loc[before.index, "status"] == before.status).all()  # the recorded trials kept as they were
    assert json.loads((run / RunPaths.META).read_text())["tune"] == f"{RunPaths.TUNE}-2"  # a new experiment


def test_a_missing_tune_state_says_so_in_one_line(
    stopped: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space, _, finished = stopped
    storage = copy_of(stopped, tmp_path)
    run = storage / "r"
    shutil.rmtree(run / RunPaths.TUNE)  # the driver died before Tune's first save

    assert run_cli(["search", str(space), "--storage", str(storage), "--name", "r", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1:] == [
        f"kdsearch: error: --resume: {run / RunPaths.TUNE} holds no Ray Tune state "
        "(the search died before its first checkpoint); start it again"
    ], err
    assert len(pd.read_parquet(run / RunPaths.TRIALS)) == finished  # nothing ran
