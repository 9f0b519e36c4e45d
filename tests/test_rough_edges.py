"""The rough edges a new user met (issue 21), each held: a finished run's elapsed time is its
duration; every JSON output is strict JSON; every report heading says what it measures; the
confirmed accuracy intervals stay within [0, 1] and say which interval they are.

Hand-built run folders (a few rows, a small Optuna study) and one one-epoch trial: no search."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kdsearch.results.confirm import display_tables, summarize
from kdsearch.results.tables import RunPaths, write_json, write_table
from tests.helpers import run_cli
from tests.test_confirm_report import OBJECTIVES, trial_rows

KDSEARCH_ROOT = Path(__file__).resolve().parents[1] / "kdsearch"


def strict(text: str) -> object:
    """`text` parsed as RFC 8259 JSON: NaN, Infinity and -Infinity refused, as JSON.parse does."""

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ---- 1. a finished run's elapsed time is its duration -----------------------------------------


def status_run(root: Path, total: int, ended: float | None = None) -> str:
    """A run started at t = 1000 s with two trials recorded, finished at 1100 and 1123 s."""
    paths = RunPaths.at(root / "run")
    meta = {"name": "run", "objectives": [list(o) for o in OBJECTIVES], "trials": total, "started": 1000.0}
    write_json(paths.store, RunPaths.META, meta if ended is None else {**meta, "ended": ended})
    trials = [{**r, "finished_at": 1100.0 + 23 * i} for i, r in enumerate(trial_rows()[:2])]
    write_table(trials, paths.store, RunPaths.TRIALS, ("trial_id",))
    epochs = [
        {"trial_id": r["trial_id"], "epoch": 2, "val_acc": r["val_acc"], "peak_memory": float("nan")} for r in trials
    ]
    write_table(epochs, paths.store, RunPaths.EPOCHS, ("trial_id",))
    return paths.uri


def status_json(uri: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert run_cli(["status", uri, "--json"]) == 0
    return strict(capsys.readouterr().out)  # type: ignore[return-value]


def test_a_finished_runs_elapsed_is_its_duration_and_a_running_ones_keeps_counting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # all its trials recorded, no `ended` (a run from before it was written): its last trial's end
    done = status_run(tmp_path / "old", total=2)
    first = status_json(done, capsys)
    assert first["elapsed_seconds"] == 123.0
    assert (first["ended_at"], first["expected_remaining_seconds"]) == (1123.0, 0)
    time.sleep(0.05)
    assert status_json(done, capsys)["elapsed_seconds"] == 123.0  # asked again later: the same
    assert run_cli(["status", done]) == 0
    assert "took 0:02:03" in capsys.readouterr().out
    # run.json's `ended` (the search writes it when its experiment returns, Ctrl-C included): that end
    stopped = status_run(tmp_path / "stopped", total=5, ended=1200.0)
    assert status_json(stopped, capsys)["elapsed_seconds"] == 200.0
    # 2 of 5 trials and no end: it goes on, and its elapsed time is the time since its start
    running = status_json(status_run(tmp_path / "running", total=5), capsys)
    assert running["ended_at"] is None and running["elapsed_seconds"] == pytest.approx(time.time() - 1000, abs=60)
    assert running["expected_remaining_seconds"] > 0


# ---- 2. every JSON output is strict JSON ---------------------------------------------------------


def test_print_json_writes_non_finite_numbers_as_null(capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from kdsearch.cli.console import print_json

    print_json({"nan": float("nan"), "inf": np.float32("inf"), "rows": [(np.int64(3), -np.inf)], "ok": 0.5})
    assert strict(capsys.readouterr().out) == {"nan": None, "inf": None, "rows": [[3, None]], "ok": 0.5}


def test_no_command_prints_json_but_through_print_json() -> None:
    """Every --json / --format json output goes through kdsearch.cli.console.print_json."""
    for path in sorted((KDSEARCH_ROOT / "cli").glob("*.py")):
        if path.name != "console.py":
            assert "json.dumps(" not in path.read_text(), f"{path.name}: print JSON with console.print_json"


def test_status_and_pareto_json_are_strict_with_nan_in_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = status_run(tmp_path, total=2)
    trials = RunPaths.at(tmp_path / "run").rows(RunPaths.TRIALS)
    for r in trials:  # a front member's recorded figure that is NaN (as mfu and peak memory are on a CPU)
        r["macs"] = float("nan")
    write_table(trials, RunPaths.at(tmp_path / "run").store, RunPaths.TRIALS, ("trial_id",))
    assert [m["macs"] for m in status_json(uri, capsys)["front"]] == [None, None]
    assert run_cli(["pareto", uri, "--format", "json"]) == 0
    assert {m["macs"] for m in strict(capsys.readouterr().out)["front"]} == {None}  # type: ignore[index]


TRIAL_SPACE = """
name: strict_json
data: {name: digits, img_size: 16}
teacher: {model: kdsearch/digits_cnn, checkpoint: unused.safetensors}
student: {embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 1.0, patch_size: 4, pos_embed: learned}
recipe: {alpha: 0.0}
train: {epochs: 1, batch_size: 256, lr: 2.0e-3, warmup_epochs: 0}
"""


def test_trial_json_is_strict_json_on_a_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One epoch of a tiny student with labels only (no teacher): peak memory and MFU are NaN on a CPU."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(TRIAL_SPACE)
    assert run_cli(["trial", "space.yaml", "--json", "--workdir", str(tmp_path / "w")]) == 0
    result = strict(capsys.readouterr().out)
    assert result["peak_memory"] is None and result["mfu"] is None and 0 <= result["val_acc"] <= 1  # type: ignore[index]


# ---- 3. every report heading says what it measures: tests/test_confirm_report.py
# test_the_report_shows_the_confirmed_section (one report of a hand-built run with a study)
# ---- 4. the confirmed accuracy intervals within [0, 1] -------------------------------------------


def test_two_seeds_near_1_give_an_interval_within_0_and_1_that_says_so() -> None:
    """The issue's case: two seeds with mean 0.9597 had the t interval [0.8715, 1.0480]."""
    rows = [
        {"trial_id": "a", "seed": s, "status": "completed", "val_acc": acc, "test_acc": acc, "flops": 1e5}
        for s, acc in enumerate((0.95275, 0.96665))
    ]
    summary = summarize(rows, [], OBJECTIVES)
    (m,) = summary["members"]
    assert m["test_acc_mean"] == pytest.approx(0.9597)
    assert m["test_acc_low"] == pytest.approx(0.8714, abs=2e-4) and m["test_acc_high"] == 1.0
    from kdsearch.results.confirm import INTERVAL

    assert summary["interval"] == INTERVAL and "clipped to [0, 1]" in INTERVAL
    (shown,) = display_tables(summary)["members"]
    assert shown["test acc (mean [95% t interval, clipped to 0..1])"] == "0.9597 [0.8714, 1.0000] clipped"
    # inside [0, 1] the t interval is as it was, with nothing said
    inside = summarize([{**r, "test_acc": r["test_acc"] - 0.5} for r in rows], [], OBJECTIVES)
    assert display_tables(inside)["members"][0]["test acc (mean [95% t interval, clipped to 0..1])"] == (
        "0.4597 [0.3714, 0.5480]"
    )
