"""Three splits: train and val carved from the training data, the test split held out; no
search reads a test image (counted in the data layer, in every process of a search)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdsearch.space.specs import DataSpec
from kdsearch.train.data import count_test_images_read, load_data, load_test
from kdsearch.train.evaluation import evaluate_test


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_digits_has_three_disjoint_stratified_splits_fixed_by_the_dataset() -> None:
    spec = DataSpec(img_size=8)
    data, test = load_data(spec), load_test(spec)
    assert (data.num_train, len(data.val), len(test)) == (1149, 288, 360)  # 1797: 20% test, then 20% of the rest val
    train, val, held = _rows(data.train.x), _rows(data.val.x), _rows(test.x)
    assert not (train & held) and not (val & held) and not (train & val)
    for y in (data.train.y, data.val.y, test.y):  # stratified: each class keeps its share (~10%) in every split
        share = np.bincount(y.numpy(), minlength=10) / len(y)
        assert share.min() > 0.085 and share.max() < 0.115
    again = load_test(spec)  # fixed: independent of any trial's seed, the same in every process
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    smaller = load_test(DataSpec(img_size=8, test_fraction=0.1))
    assert len(smaller) == 180 and load_data(DataSpec(img_size=8, test_fraction=0.1)).num_train == 1293


def test_reading_the_test_split_is_counted() -> None:
    test = load_test(DataSpec())
    before = count_test_images_read()
    acc = evaluate_test(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)), test, batch_size=100)
    assert 0.0 <= acc <= 1.0 and count_test_images_read() - before == len(test) == 360


def test_a_search_reads_no_test_image(small_run) -> None:
    result, space = small_run
    assert len(result.trials) == 8 and any(r["status"] == "completed" for r in result.trials)
    log = Path(space).parent / "test_reads.log"  # the fixture's KDSEARCH_TEST_READ_LOG, seen by every worker
    assert not log.exists(), log.read_text()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_split_fractions_are_checked(tmp_path: Path, fraction: float) -> None:
    from kdsearch.errors import SpaceError
    from kdsearch.space.file import load_space

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ndata: {{name: digits, test_fraction: {fraction}}}\nstudent: {{embed_dim: 32}}\n")
    with pytest.raises(SpaceError, match="data.test_fraction.*strictly between 0 and 1"):
        load_space(path)
