"""`kdsearch confirm`: the front's members retrained with several seeds by a Ray search of its
own, measured on val and on the held-out test split; same seed, same numbers (CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from kdsearch.results.export import spec_of
from kdsearch.results.tables import RunPaths
from kdsearch.search.confirm import run_confirm
from kdsearch.train.data import TEST_READ_LOG, load_data
from kdsearch.train.trial import TrialSetup, run_trial
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def confirmed(small_run, tmp_path_factory: pytest.TempPathFactory):
    result, _ = small_run
    log = tmp_path_factory.mktemp("confirm") / "test_reads.log"
    os.environ[TEST_READ_LOG] = str(log)  # Ray's workers start inside run_confirm and inherit it
    messages: list[str] = []
    try:
        rows = run_confirm(result.paths.uri, seeds=2, top=2, say=messages.append)
    finally:
        del os.environ[TEST_READ_LOG]
    return result, rows, messages, log


def test_confirm_retrains_each_member_with_each_seed(confirmed) -> None:
    result, rows, messages, log = confirmed
    assert any("confirming 2 trials x 2 seeds: 4 to train" in m for m in messages), messages
    by_id = {r["trial_id"]: r for r in result.trials}
    assert len(rows) == 4 and len({(r["trial_id"], r["seed"]) for r in rows}) == 4
    for row in rows:
        own = by_id[row["trial_id"]]
        assert own["status"] == "completed" and row["status"] == "completed", row
        assert row["seed"] in (own["train.seed"] + 1, own["train.seed"] + 2) and row["train.seed"] == row["seed"]
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["val_acc"] <= 1.0
        assert row["flops"] == own["flops"] and row["student.depth"] == own["student.depth"]
        assert row["epochs"] == own["epochs_total"]
    # the retrained students were measured on the test split, in the Ray workers: 360 images each
    reads = [int(line.split()[1]) for line in Path(log).read_text().splitlines()]
    assert sum(reads) == 4 * 360
    assert RunPaths.at(result.paths.uri).rows(RunPaths.CONFIRM) == rows


def test_same_seed_same_numbers(confirmed, tmp_path: Path) -> None:
    result, rows, _, _ = confirmed
    row = rows[0]
    member = next(r for r in result.trials if r["trial_id"] == row["trial_id"])
    spec = spec_of(member)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=row["seed"]))
    reports: list[dict] = []
    cache = Path(result.paths.uri).parent / "cache"  # the run's teacher cache, as the retraining read it
    run_trial(spec, TrialSetup(workdir=tmp_path / "w", data=load_data(spec.data), cache_dir=cache), reports.append)
    assert reports[-1]["val_acc"] == row["val_acc"]


def test_confirm_again_trains_only_what_is_missing(confirmed) -> None:
    result, rows, _, _ = confirmed
    messages: list[str] = []
    again = run_confirm(result.paths.uri, seeds=2, top=2, say=messages.append)
    assert any("0 to train, 4 already in confirm.parquet" in m for m in messages), messages
    assert again == rows


def test_confirm_command_prints_intervals_and_the_report_shows_them(
    confirmed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result, rows, _, _ = confirmed
    uri = result.paths.uri
    assert run_cli(["confirm", uri, "--seeds", "2", "--top", "2", "--format", "json"]) == 0  # all done: trains nothing
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["members"]) == 2 and all(m["n"] == 2 for m in summary["members"])
    for m in summary["members"]:
        tests = [r["test_acc"] for r in rows if r["trial_id"] == m["trial_id"]]
        assert m["test_acc_mean"] == pytest.approx(sum(tests) / 2)
        assert m["test_acc_low"] <= m["test_acc_mean"] <= m["test_acc_high"]
    assert run_cli(["confirm", uri, "--seeds", "2", "--top", "2"]) == 0
    table = capsys.readouterr().out
    assert "Confirmed with 2 seeds" in table and "Welch" in table
    assert run_cli(["report", uri, "--out", str(tmp_path / "report")]) == 0
    assert "Confirmed with 2 seeds" in (tmp_path / "report" / "report.md").read_text()
    assert run_cli(["confirm", uri, "--trial", "nope"]) == 2
    assert "--trial: no trial nope in this run" in capsys.readouterr().err
