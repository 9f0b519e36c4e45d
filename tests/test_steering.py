"""Steering a search: enqueued configs run first, `--from RUN` starts the sampler from an
earlier run, `--resume --trials N` grows a finished run without rerunning any trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from kdsearch.results.tables import RunPaths
from kdsearch.search.run import run_search
from kdsearch.search.searcher import DefineByRun
from kdsearch.search.warm_start import add_earlier_trials
from kdsearch.space.file import load_space
from kdsearch.space.samplers import make_sampler
from tests.helpers import run_cli, write_space

ENQUEUED = [
    {"student.embed_dim": 32, "student.depth": 1, "student.patch_size": 4, "student.pos_embed": "none"},
    {"student.embed_dim": 48, "student.depth": 1, "student.patch_size": 4, "student.pos_embed": "rope"},
]


pytestmark = pytest.mark.usefixtures("shared_ray")  # four searches, one Ray


@pytest.fixture(scope="module")
def spaces(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 4-trial NSGA-II space (population 4), plain and with two configs enqueued."""
    plain = write_space(tmp_path_factory.mktemp("plain"), digits_teacher_path, trials=4, epochs=1, sampler="nsga2")
    text = plain.read_text()
    enqueue = "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in c.items()) + "}" for c in ENQUEUED) + "]"
    assert "max_failures: 2," in text
    queued = plain.parent / "queued.yaml"
    queued.write_text(text.replace("max_failures: 2,", f"max_failures: 2, enqueue: {enqueue},"))
    return plain, queued


@pytest.fixture(scope="module")
def first_run(spaces, tmp_path_factory: pytest.TempPathFactory):
    _, queued = spaces
    storage = tmp_path_factory.mktemp("runs")
    result = run_search(queued, storage=storage, name="first", say=lambda s: None)
    return result, storage


def test_enqueued_configs_run_first(first_run) -> None:
    result, _ = first_run
    rows = sorted(result.trials, key=lambda r: r["optuna_trial"])
    assert len(rows) == 4
    for row, config in zip(rows[:2], ENQUEUED):
        assert {k: row[k] for k in config} == config, row


def test_from_starts_the_sampler_from_an_earlier_run(spaces, first_run, tmp_path: Path) -> None:
    plain, _ = spaces
    earlier, storage = first_run
    messages: list[str] = []
    result = run_search(
        plain, storage=storage, name="second", from_run=earlier.paths.uri, trials=2, say=messages.append
    )
    assert any("the sampler starts from 4 trials of" in m for m in messages), messages
    new = sorted(result.trials, key=lambda r: r["optuna_trial"])
    assert len(new) == 2 and new[0]["optuna_trial"] == 4  # the 4 earlier trials are the study's first
    space = load_space(plain)
    keys = list(space.dims)

    def first_suggestion(warm: bool) -> dict:
        directions = ["maximize" if m == "max" else "minimize" for _, m in space.objectives]
        study = optuna.create_study(directions=directions, sampler=make_sampler(space.search))
        if warm:
            add_earlier_trials(study, space, earlier.trials, space.objectives, study.sampler)
        spec = DefineByRun(space)(study.ask())["kdsearch"]["spec"]
        return {k: spec[k] for k in keys if k in spec}

    got = {k: new[0][k] for k in keys if k in new[0]}
    # the earlier trials are NSGA-II's generation 0 (its parents), told through its generation key
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(space.search))
    add_earlier_trials(study, space, earlier.trials, space.objectives, study.sampler)
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    generations = [{k: v for k, v in t.system_attrs.items() if k.endswith("generation")} for t in study.trials]
    assert len(generations) == 4 and all(list(g.values()) == [0] for g in generations), generations
    assert got == first_suggestion(warm=True)  # what a study that knows the earlier trials asks first...
    assert got != first_suggestion(warm=False)  # ...is not what a fresh run with the same seed asks first
    assert RunPaths.at(storage / "second").meta()["from"] == earlier.paths.uri


def test_resume_with_more_trials_extends_a_finished_run(spaces, first_run, capsys) -> None:
    _, queued = spaces
    earlier, storage = first_run
    before = {r["trial_id"]: r for r in RunPaths.at(storage / "first").rows(RunPaths.TRIALS)}
    messages: list[str] = []
    result = run_search(queued, storage=storage, name="first", resume=True, trials=6, say=messages.append)
    assert any("extending" in m and "from 4 to 6 trials" in m for m in messages), messages
    after = {r["trial_id"]: r for r in result.trials}
    assert len(after) == 6 and set(before) < set(after)
    for tid, row in before.items():  # nothing reran: the first four rows are untouched
        assert after[tid]["finished_at"] == row["finished_at"] and after[tid]["status"] == row["status"]
    epochs = RunPaths.at(storage / "first").rows(RunPaths.EPOCHS)
    assert len({(r["trial_id"], r["epoch"]) for r in epochs}) == len(epochs)
    meta = RunPaths.at(storage / "first").meta()
    assert meta["trials"] == 6 and meta["tune"] == "tune-2"
    # resumed again with nothing to add: said so, nothing runs; fewer trials than it has is refused
    messages.clear()
    again = run_search(queued, storage=storage, name="first", resume=True, say=messages.append)
    assert len(again.trials) == 6 and any("already has 6 trials" in m for m in messages), messages
    args = ["search", str(queued), "--storage", str(storage), "--name", "first", "--resume", "--trials", "5"]
    assert run_cli(args) == 2
    assert "can only extend it" in capsys.readouterr().err
