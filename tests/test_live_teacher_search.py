"""Feature distillation inside a Ray search: a trial whose recipe needs the teacher's insides runs
the teacher live in its Ray worker (the driver ships its weights through the object store), beside
a trial of the same search that reads the driver's logit cache."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from kdsearch.results.tables import RunPaths
from kdsearch.space.specs import DataSpec
from kdsearch.train.data import load_data
from tests.helpers import run_dir, train_every_trial, write_space


def tune_results(run: Path) -> dict[str, list[dict]]:
    """Every result Ray Tune recorded in the run's experiment (tune/*/result.json), by trial id."""
    found: dict[str, list[dict]] = {}
    for path in (run / RunPaths.TUNE).glob("*/result.json"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found.setdefault(row["trial_id"], []).append(row)
    return found


def test_a_feature_distillation_trial_runs_the_teacher_live_in_its_worker(
    digits_teacher_path: Path, tmp_path: Path
) -> None:
    from kdsearch.search.run import run_search

    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=2, epochs=1, max_concurrent=1))
    raw = yaml.safe_load(space.read_text())
    raw["recipe"]["feature_weight"] = [0.0, 0.5]
    raw["search"]["enqueue"] = [{"recipe.feature_weight": 0.5}, {"recipe.feature_weight": 0.0}]
    space.write_text(yaml.safe_dump(raw, sort_keys=False))

    result = run_search(space, storage=tmp_path / "runs", say=lambda s: None)
    run = run_dir(result)
    trials = pd.read_parquet(run / RunPaths.TRIALS).set_index("trial_id")
    assert sorted(trials["recipe.feature_weight"]) == [0.0, 0.5] and (trials.status == "completed").all()
    live = trials.index[trials["recipe.feature_weight"] == 0.5][0]
    cached = trials.index[trials["recipe.feature_weight"] == 0.0][0]

    # the live trial's teacher ran on every image its epoch trained on; the other's never ran (the cache)
    epochs = pd.read_parquet(run / RunPaths.EPOCHS).set_index("trial_id")
    trained_on = sum(len(x) for x, _, _ in load_data(DataSpec(name="digits", img_size=16)).train_batches(64, 0, 0))
    assert epochs.loc[live, "teacher_images"] == trained_on
    assert epochs.loc[cached, "teacher_images"] == 0
    # and its loss had the feature term, computed from the teacher's features in the worker
    reported = tune_results(run)
    assert all(r["loss_feature"] > 0 for r in reported[live]), reported[live]
    assert reported[cached] and all("loss_feature" not in r for r in reported[cached])
