"""`kdsearch study`: a run's students carried to other resolutions by a Ray search of its own,
measured zero-shot and after a fine-tune; a second call computes nothing (CPU)."""

from __future__ import annotations

import pytest

from kdsearch.results.export import spec_of
from kdsearch.results.study import FINETUNED, ZERO_SHOT
from kdsearch.results.tables import RunPaths
from kdsearch.search.study import run_study
from kdsearch.space import objectives as objective_table
from tests.helpers import run_cli

RESOLUTIONS = [12, 16]  # the run trains at 16 px with patches of 2 or 4


def _members(trials: list[dict]) -> list[dict]:
    """Two completed trials with other encodings, one of them with a table to carry when there is one."""
    done = [r for r in trials if r["status"] == "completed"]
    done.sort(key=lambda r: r["student.pos_embed"] not in ("learned", "relpos"))
    first = done[0]
    return [first, next(r for r in done if r["student.pos_embed"] != first["student.pos_embed"])]


@pytest.fixture(scope="module")
def studied(small_run):
    result, _ = small_run
    members = _members(result.trials)
    ids = [m["trial_id"] for m in members]
    messages: list[str] = []
    rows = run_study(
        result.paths.uri, resolutions=RESOLUTIONS, finetune_epochs=1, seeds=1, trial_ids=ids, say=messages.append
    )
    return result, members, rows, messages


def test_each_member_is_measured_at_each_resolution_zero_shot_and_fine_tuned(studied) -> None:
    result, members, rows, messages = studied
    assert any("4 of 4 measurements" not in m and "8 of 8 measurements to make" in m for m in messages), messages
    keys = {(r["trial_id"], r["img_size"], r["mode"], r["seed"]) for r in rows}
    assert len(rows) == len(keys) == 8
    store = RunPaths.at(result.paths.uri).store
    for m in members:
        own = [r for r in rows if r["trial_id"] == m["trial_id"]]
        assert all(r["status"] == "completed" and r["pos_embed"] == m["student.pos_embed"] for r in own), own
        assert {(r["img_size"], r["mode"]) for r in own} == {
            (px, mode) for px in RESOLUTIONS for mode in (ZERO_SHOT, FINETUNED)
        }
        at_16 = next(r for r in own if r["img_size"] == 16 and r["mode"] == ZERO_SHOT)
        assert at_16["val_acc"] == pytest.approx(m["val_acc"], abs=1e-9) and at_16["flops"] == m["flops"]
        at_12 = next(r for r in own if r["img_size"] == 12 and r["mode"] == ZERO_SHOT)
        spec = spec_of(at_12)
        assert spec.student.img_size == 12 and at_12["flops"] == objective_table.computed(spec.student)["flops"]
        assert at_12["flops"] < m["flops"] and 0.0 <= at_12["test_acc"] <= 1.0
        for r in own:
            tuned = r["mode"] == FINETUNED
            assert r["seed"] == m["train.seed"] + tuned and r["finetune_epochs"] == int(tuned)
            assert (r["weights"] is not None) == tuned and (not tuned or store.exists(r["weights"]))


def test_a_second_call_computes_nothing_and_bad_sizes_are_one_line(studied, capsys) -> None:
    result, members, rows, _ = studied
    messages: list[str] = []
    again = run_study(
        result.paths.uri,
        resolutions=RESOLUTIONS,
        finetune_epochs=1,
        seeds=1,
        trial_ids=[m["trial_id"] for m in members],
        say=messages.append,
    )
    assert any("0 of 8 measurements to make" in m for m in messages), messages
    assert again == rows
    trials = [arg for m in members for arg in ("--trial", m["trial_id"])]
    args = ["study", result.paths.uri, "--resolutions", "16,12", "--finetune-epochs", "1", "--seeds", "1", *trials]
    capsys.readouterr()
    assert run_cli([*args, "--format", "csv"]) == 0
    printed = capsys.readouterr()
    assert "0 of 8 measurements to make" in printed.err
    lines = printed.out.strip().splitlines()
    assert lines[0] == "encoding,trial,px,MFLOPs,zero-shot,fine-tuned" and len(lines) == 1 + 4
    assert {line.split(",")[0] for line in lines[1:]} == {m["student.pos_embed"] for m in members}
    assert run_cli(["study", result.paths.uri, "--resolutions", "13", "--trial", members[0]["trial_id"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resolutions 13" in err and "does not divide it" in err
