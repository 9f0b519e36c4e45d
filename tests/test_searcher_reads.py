"""The searcher reads trials.parquet once per driver (issue 12: it read the table for every new
trial), and again after a restore, when the table may hold trials its saved state lacks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search import Searcher

from kdsearch.results.tables import RunPaths
from kdsearch.search.searcher import DefineByRun, KdsearchOptunaSearch
from kdsearch.space.file import load_space
from kdsearch.space.samplers import make_sampler

REPO = Path(__file__).resolve().parents[1]


def test_trials_parquet_is_read_once_and_again_after_a_restore(tmp_path: Path) -> None:
    space = load_space(REPO / "search_spaces/digits_quick.yaml")
    run = RunPaths.at(tmp_path / "run")
    recorded = [{"trial_id": f"old{i}", "status": "completed", "val_acc": 0.5, "flops": 1e6} for i in range(2)]
    (tmp_path / "run").mkdir()
    pd.DataFrame(recorded).to_parquet(tmp_path / "run" / RunPaths.TRIALS, index=False)
    searcher = KdsearchOptunaSearch(
        space=DefineByRun(space),
        metric=["val_acc", "flops"],
        mode=["max", "min"],
        sampler=make_sampler(space.search),
        run=run,
        total=4,
    )
    assert "kdsearch" in searcher.suggest("a")
    (tmp_path / "run" / RunPaths.TRIALS).write_bytes(b"not parquet")  # read again, this would fail
    assert "kdsearch" in searcher.suggest("b")
    assert searcher.suggest("c") == Searcher.FINISHED  # 2 recorded + 2 asked = the total, from memory
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))
    restored = KdsearchOptunaSearch(
        space=DefineByRun(space), metric=["val_acc", "flops"], mode=["max", "min"], run=run, total=4
    )
    restored.restore(str(saved))
    with pytest.raises(Exception):  # noqa: B017 - whatever the reader raises: it did read the table again
        restored.suggest("d")
