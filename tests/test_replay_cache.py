"""The replay cache: the teacher runs once per (image, epoch) under random augmentation, and a
trial rebuilds each view from its stored seed, bit for bit, whatever its batch size or order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kdsearch.space.specs import DataSpec, replay_bytes_per_view
from kdsearch.storage import Storage
from kdsearch.train.data import load_data, view_seeds
from kdsearch.train.logit_cache import cache_key
from kdsearch.train.replay_cache import ReplayCache, build_replay_cache, teacher_views
from kdsearch.train.teacher import run_teacher
from tests.helpers import write_space

EPOCHS = 2


@pytest.fixture(scope="module")
def augmented():
    return load_data(DataSpec(augment=True))


@pytest.fixture(scope="module")
def teacher(digits_space):
    from kdsearch.train.teacher import load_teacher

    return load_teacher(digits_space)


@pytest.fixture(scope="module")
def replay(augmented, teacher, digits_space, tmp_path_factory: pytest.TempPathFactory) -> ReplayCache:
    cache = ReplayCache(Storage.open(tmp_path_factory.mktemp("replay")), cache_key(digits_space.teacher, augmented), 10)
    assert build_replay_cache(teacher, augmented, cache, EPOCHS) == augmented.num_train * EPOCHS
    assert build_replay_cache(teacher, augmented, cache, EPOCHS) == 0  # nothing twice
    return cache


def test_views_differ_by_epoch_and_are_the_augmentation(augmented) -> None:
    assert augmented.random_augment
    idx = np.arange(8)
    first = augmented.views(idx, view_seeds(0, augmented.num_train)[idx])
    second = augmented.views(idx, view_seeds(1, augmented.num_train)[idx])
    plain = next(augmented.train_batches_in_order(8))[0]
    assert not torch.equal(first, second) and not torch.equal(first, plain)
    assert first.shape == plain.shape and (first - plain).abs().mean() < 1.0  # a small shift and turn, not noise


def test_a_trial_rebuilds_each_stored_view_bit_for_bit(augmented, teacher, replay: ReplayCache) -> None:
    """For a sample of (image, epoch) pairs: the view a trial's batches rebuild from the stored
    seed is the view the cache was built from, and the teacher's logits on it are the stored ones
    within fp16 rounding."""
    rng = np.random.default_rng(0)
    for epoch in range(EPOCHS):
        stored = replay.read(epoch)
        assert stored.seeds.dtype == np.uint32 and np.array_equal(stored.seeds, view_seeds(epoch, augmented.num_train))
        sample = np.sort(rng.choice(augmented.num_train, 40, replace=False))
        built = augmented.views(sample, stored.seeds[sample])  # what the cache's builder saw, in index order
        for batch_size, trial_seed in ((64, 0), (37, 5)):  # two trials: other batch sizes, other orders
            seen = {}
            for x, _, idx in augmented.train_batches(batch_size, epoch, trial_seed, seeds=stored.seeds):
                seen.update({int(i): v for i, v in zip(idx, x)})
            for row, i in enumerate(sample):
                if i in seen:
                    assert torch.equal(seen[i], built[row]), (epoch, i, batch_size)
        logits = run_teacher(teacher, built).logits
        torch.testing.assert_close(
            stored.logits.take(torch.as_tensor(sample)), logits.half().float(), rtol=1e-3, atol=1e-3
        )


def test_the_cache_stores_four_bytes_and_the_logits_per_view(augmented, replay: ReplayCache) -> None:
    stored = replay.read(0)
    assert (
        stored.logits.values.shape == (augmented.num_train, 10) and stored.logits.indices is None
    )  # dense: 10 classes
    assert replay_bytes_per_view(10, 10) == 4 + 2 * 10 and replay_bytes_per_view(1000, 10) == 4 + 10 * 4
    raw = replay.store.read_bytes(replay.name(0))
    assert (
        len(raw) < augmented.num_train * replay_bytes_per_view(10, 10) + 2_000
    )  # the arrays, and an npz's few headers
    with pytest.raises(FileNotFoundError, match="no epoch 5"):
        replay.read(5)


def test_sparse_epochs_keep_the_top_k(tmp_path: Path) -> None:
    cache = ReplayCache(Storage.open(tmp_path), "k", 200, topk=7)
    logits = torch.randn(6, 200)
    cache.write(0, np.arange(6, dtype=np.uint32), logits)
    back = cache.read(0).logits
    assert back.indices.shape == (6, 7)
    dense = back.take(torch.arange(6))
    top = logits.topk(7, dim=1)
    torch.testing.assert_close(dense.gather(1, top.indices), top.values.half().float())


def test_views_of_a_shard_are_those_of_the_whole(augmented, teacher) -> None:
    seeds, logits = teacher_views(teacher, augmented, 1, 100, 160)
    all_seeds, all_logits = teacher_views(teacher, augmented, 1)
    assert np.array_equal(seeds, all_seeds[100:160])
    torch.testing.assert_close(logits, all_logits[100:160], rtol=1e-5, atol=1e-5)


def test_a_search_with_augmentation_runs_the_teacher_once_per_view(digits_teacher_path: Path, tmp_path: Path) -> None:
    """A real local search: the teacher sees each (image, epoch) view exactly once in total
    (by the cache's Ray tasks), and zero times inside the trials."""
    from kdsearch.search.run import run_search

    space = write_space(tmp_path, digits_teacher_path, trials=3, epochs=3, max_concurrent=1)
    raw = yaml.safe_load(space.read_text())
    raw["data"]["augment"] = True
    raw["budget"] = {"max_gflops": None}
    raw["recipe"]["alpha"] = {"low": 0.5, "high": 1.0}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    messages: list[str] = []
    result = run_search(space, storage=tmp_path / "runs", say=messages.append)
    views = [m for m in messages if "teacher views cached once" in m]
    assert len(views) == 1 and f"{1149 * 3:,} (image, epoch) views" in views[0], messages
    epochs = pd.read_parquet(result.paths.store.local_path() / "epochs.parquet")
    assert len(epochs) and (epochs.teacher_images == 0).all()
    cache = list((tmp_path / "runs" / "cache").glob("teacher-replay-*/epoch-*.npz"))
    assert sorted(p.name for p in cache) == ["epoch-0000.npz", "epoch-0001.npz", "epoch-0002.npz"]
    trials = pd.read_parquet(result.paths.store.local_path() / "trials.parquet")
    assert (trials.status == "completed").sum() >= 1 and not (trials.status == "failed").any()


def test_space_show_says_what_the_cache_will_hold() -> None:
    from kdsearch.space.file import load_space
    from kdsearch.space.summary import summarize

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    augmented = summarize(load_space(root / "digits_augment.yaml"), samples=10)["teacher_cache"]
    assert augmented == {
        "kind": "replay",
        "bytes_per_view": 4 + 2 * 10,
        "epochs": 15,
        "bytes_per_training_image": 24 * 15,
    }
    plain = summarize(load_space(root / "digits_quick.yaml"), samples=10)["teacher_cache"]
    assert plain == {"kind": "logits", "bytes_per_training_image": 4 * 10}
