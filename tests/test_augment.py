"""The seeded views batched on the device: an image's view is a pure function of (image, seed),
the same bits in any batch, batch size or order and through the one-image path image folders
take; a replay cache built by one path replays in the other; in-memory data is carved
stratified with a plain val; a changed transform is a new fingerprint."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdsearch.space.specs import DataSpec
from kdsearch.storage import Storage
from kdsearch.train.augment import ViewTransform, resized_crop_boxes, seed_uniforms
from kdsearch.train.data import Data, in_memory_data, load_data, view_seeds
from kdsearch.train.folder_data import FolderSplit
from kdsearch.train.replay_cache import ReplayCache, build_replay_cache

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
RNG = np.random.default_rng(0)
IMAGES = torch.from_numpy(RNG.integers(0, 256, (60, 3, 20, 20), dtype=np.uint8))
LABELS = torch.arange(60) % 5


@pytest.mark.parametrize("size", [20, 24, 72, 96])  # pad-crop kept, pad-crop resized, resized crop up to 72 and 96
def test_a_batch_gives_each_image_the_bits_it_gets_alone(size: int) -> None:
    t = ViewTransform(size, MEAN, STD, augment=True)
    for epoch in range(2):
        seeds = view_seeds(epoch, len(IMAGES))
        alone = torch.stack([t.view_of(IMAGES[i], int(seeds[i])) for i in range(len(IMAGES))])
        assert alone.shape == (60, 3, size, size) and alone.dtype == torch.float32
        for batch_size in (1, 7, 60):
            order = np.random.default_rng(epoch * 10 + batch_size).permutation(len(IMAGES))
            for start in range(0, len(order), batch_size):
                part = order[start : start + batch_size]
                assert torch.equal(t.views(IMAGES[part], seeds[part]), alone[part]), (size, epoch, batch_size)
    other = torch.stack([t.view_of(IMAGES[i], int(s)) for i, s in enumerate(view_seeds(7, len(IMAGES)))])
    plain = ViewTransform(size, MEAN, STD).views(IMAGES)
    assert not torch.equal(other, alone) and not torch.equal(alone, plain)  # seeds matter; views are not plain


def test_the_parameters_are_a_hash_of_the_seed_not_a_global_rng() -> None:
    seeds = np.array([0, 1, 2**32 - 1, 12345], dtype=np.uint32)
    torch.manual_seed(0)
    first = seed_uniforms(seeds, 5)
    torch.manual_seed(1)
    np.random.seed(1)
    assert np.array_equal(first, seed_uniforms(seeds, 5)) and np.array_equal(first[1:2], seed_uniforms(seeds[1:2], 5))
    assert ((first >= 0) & (first < 1)).all() and len(np.unique(first)) == first.size
    boxes, flips = resized_crop_boxes(view_seeds(0, 4000), 32, 32)
    area = boxes[:, 2] * boxes[:, 3] / (32 * 32)
    assert area.min() >= 0.07 and area.max() <= 1 and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    assert 0.45 < flips.mean() < 0.55  # torchvision's scale and ratio ranges, half the views flipped


def test_in_memory_data_is_carved_stratified_with_a_plain_val() -> None:
    data = in_memory_data(
        DataSpec(name="cifar10", img_size=24, augment=True), IMAGES, LABELS, num_classes=5, fingerprint="x",
        mean=MEAN, std=STD,
    )  # fmt: skip
    assert (data.num_train, len(data.val), data.in_chans) == (48, 12, 3) and data.random_augment
    assert sorted(np.bincount(data.val.y.numpy())) == [2, 2, 2, 3, 3]  # stratified: each class its share of 12
    rows = {bytes(r.flatten().numpy()) for r in IMAGES}
    train_rows = {bytes(r.flatten().numpy()) for r in data.train.x}
    val_rows = {bytes(r.flatten().numpy()) for r in data.val.x}
    assert train_rows | val_rows == rows and not train_rows & val_rows
    x, y, idx = next(data.val_batches(100))
    assert torch.equal(x, ViewTransform(24, MEAN, STD).views(data.val.x)) and torch.equal(idx, torch.arange(12))
    plain = torch.cat([b[0] for b in data.train_batches_in_order(10)])
    assert torch.equal(plain, ViewTransform(24, MEAN, STD).views(data.train.x))
    back = pickle.loads(pickle.dumps(data))  # travels to a worker without its device copies
    assert back.train.plain.transform.augment is False and torch.equal(next(back.val_batches(100))[0], x)


class Tiny(nn.Module):
    """A teacher as kdsearch runs one (timm's forward_features and forward_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)


@pytest.mark.parametrize("size", [24, 72])
def test_a_replay_cache_built_by_one_path_replays_in_the_other(size: int, tmp_path: Path) -> None:
    """The same training images in memory (batched views) and as PNG files read by a loader's
    worker (one image at a time): the replay cache built from either gives the other's views,
    and the teacher's logits of the other's batches are the stored ones."""
    from PIL import Image

    memory = in_memory_data(
        DataSpec(name="cifar10", img_size=size, augment=True), IMAGES, LABELS, num_classes=5, fingerprint="x",
        mean=MEAN, std=STD,
    )  # fmt: skip
    samples = []
    for i, (img, label) in enumerate(zip(memory.train.x, memory.train.y)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        samples.append((str(tmp_path / f"{i}.png"), int(label)))
    folder = Data(memory.spec, FolderSplit(samples, memory.train.transform), memory.val, 5, 3, "y", random_augment=True)
    teacher = Tiny()
    for built, replayed in ((memory, folder), (folder, memory)):
        cache = ReplayCache(Storage.open(tmp_path / f"cache-{id(built)}"), "k", 5)
        assert build_replay_cache(teacher, built, cache, 2) == 2 * built.num_train
        for epoch in range(2):
            stored = cache.read(epoch)
            for x, _, idx in replayed.train_batches(16, epoch, 3, workers=1 if replayed is folder else 0,
                                                    seeds=stored.seeds):  # fmt: skip
                assert torch.equal(x, built.views(idx, stored.seeds[idx.numpy()]))
                with torch.no_grad():
                    logits = teacher.forward_head(teacher.forward_features(x))
                    torch.testing.assert_close(stored.logits.take(idx), logits.half().float())


def write_cifar10(root: Path, images: np.ndarray, labels: list[int]) -> None:
    """A CIFAR-10 python folder: five training batches and a test batch (torchvision's layout)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    flat = images.reshape(len(images), -1)
    parts = np.array_split(np.arange(len(images)), 5)
    for i, part in enumerate(parts, 1):
        entry = {"data": flat[part], "labels": [labels[j] for j in part]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": flat[:10], "labels": labels[:10]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))


def test_the_fingerprint_is_the_content_and_the_views(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    labels = [i % 10 for i in range(50)]
    write_cifar10(tmp_path / "a", images, labels)
    write_cifar10(tmp_path / "b", images, labels)
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1
    write_cifar10(tmp_path / "c", changed, labels)
    fp = {k: load_data(DataSpec(name="cifar10", root=str(tmp_path / k))).fingerprint for k in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]  # the same CIFAR in two folders is one cache; one pixel is another
    assert load_data(DataSpec(name="cifar10", root=str(tmp_path / "a"), img_size=48)).fingerprint != fp["a"]
    parts = {"name": "cifar10", "root": str(tmp_path / "a"), "img_size": 32, "n": 50, "val_fraction": 0.2,
             "split_seed": 0}  # fmt: skip
    old = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fp["a"] != old  # the per-image torchvision path's caches are never reused
    data = load_data(DataSpec(name="cifar10", root=str(tmp_path / "a"), augment=True))
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape == (40, 3, 32, 32)
    assert data.fingerprint == fp["a"]  # the plain views (and the teacher's split) do not change with augment
