"""Ctrl-C during `kdsearch search`: one line of what finished and kdsearch's own resume command
(none of Ray Tune's advice or warnings, no traceback); the resumed run, started with fewer
trials than its space says, finishes at its own total without calling itself stopped."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kdsearch.results.tables import RunPaths
from tests.helpers import KDSEARCH, interrupt_search, write_space


def test_ctrl_c_says_what_finished_and_how_to_resume(digits_teacher_path: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, digits_teacher_path, trials=8, epochs=2, max_concurrent=1)
    storage = tmp_path / "runs"
    run = RunPaths.at(storage / "r")
    out, err = interrupt_search(["search", str(space), "--storage", str(storage), "--name", "r", "--trials", "3"], run)
    finished = len(run.rows(RunPaths.TRIALS))
    assert 1 <= finished < 3
    line = f"stopped with {finished} of 3 trials finished"
    assert line in err and f"--name r --storage {storage} --resume" in err, err
    for noise in ("Tuner.restore", "Failed to fetch metrics", "Traceback", "No artists with labels"):
        assert noise not in out + err, noise

    resumed = subprocess.run(
        [*KDSEARCH, "search", str(space), "--storage", str(storage), "--name", "r", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert len(run.rows(RunPaths.TRIALS)) == 3  # the run's own total (run.json), not the space's 8
    assert "stopped with" not in resumed.stderr and "Pareto front" in resumed.stdout
    said = f"resuming {storage / 'r'}: a new experiment starts from its {finished} recorded trials"
    assert said in " ".join(resumed.stderr.split()), resumed.stderr
