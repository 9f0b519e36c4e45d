"""Datasets: scikit-learn's digits (bundled), CIFAR-10/100 and image folders from a local root,
and any in-memory set (`in_memory_data`, `in_memory_test`: kdsearch.train.memory_data).

CIFAR is fetched on first use (kdsearch.train.fetch), a Hugging Face hub id by `datasets`
(kdsearch.train.hf_data); image folders are read where they are. `Data` (kdsearch.train.splits)
is a train and a val split whose batches carry the indices of their images, so a trial can look
up the teacher's cached logits for exactly those images.

Three splits. `load_data` gives train and val, both carved from the dataset's training data
(stratified, seed `SPLIT_SEED`, independent of any trial's seed: every trial of a search is
measured on the same val images). The test split is never part of `Data`: only
`load_test` reads it (for `eval`, `export` and `confirm`), and it counts every test image read
(`count_test_images_read`; with KDSEARCH_TEST_READ_LOG set, each process also appends its reads to
that file), so "no search reads a test image" is checked, not assumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import DataSpec
from kdsearch.train.augment import ViewTransform, shift_and_rotate
from kdsearch.train.folder_data import FolderSplit
from kdsearch.train.hf_data import read_hf_test, read_hf_train
from kdsearch.train.memory_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLIT_SEED,
    content_hash,
    fingerprint,
    in_memory_data,
    in_memory_test,
    stratified,
)
from kdsearch.train.splits import Batch, Data, TensorSplit, batches, view_seeds

__all__ = [
    "LOADERS", "SPLIT_SEED", "Batch", "Data", "TensorSplit", "count_test_images_read", "in_memory_data",
    "in_memory_test", "load_data", "load_test", "read_test_batches", "shift_and_rotate", "view_seeds",
]  # fmt: skip

TEST_READ_LOG = "KDSEARCH_TEST_READ_LOG"  # a file each process appends "pid images" to when it reads test images
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_data(spec: DataSpec | object) -> Data:
    """The data a space (or a DataSpec) names, by its loader in `LOADERS`.
    Raises KdsearchError on an unknown name or a missing root."""
    if not isinstance(spec, DataSpec):
        spec = spec.data  # a SearchSpace or a TrialSpec
    if spec.name not in DATASETS:
        raise KdsearchError(f"data.name: unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    return LOADERS[spec.name].train_val(spec)


def _digits(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]]]:
    """Digits' images (scaled to img_size, normalized), labels and the indices of each split:
    test held out first (data.test_fraction), then val carved from the rest (data.val_fraction)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    if spec.img_size != 8:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    rest, test = stratified(list(range(len(y))), digits.target, spec.test_fraction)
    train, val = stratified(rest, digits.target[rest], spec.val_fraction)
    return x, y, {"train": train, "val": val, "test": test}


def load_digits(spec: DataSpec) -> Data:
    x, y, split = _digits(spec)
    idx_train, idx_val = split["train"], split["val"]
    train = TensorSplit(
        x[idx_train].contiguous(), y[idx_train].contiguous(), shift_and_rotate if spec.augment else None
    )
    val = TensorSplit(x[idx_val].contiguous(), y[idx_val].contiguous())
    fp = fingerprint(
        name="digits", img_size=spec.img_size, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
        split_seed=SPLIT_SEED, n=len(y),
    )  # fmt: skip
    return Data(spec, train, val, 10, DATASETS["digits"].in_chans, fp, random_augment=spec.augment)


def load_digits_test(spec: DataSpec) -> Dataset:
    x, y, split = _digits(spec)
    return TensorSplit(x[split["test"]].contiguous(), y[split["test"]].contiguous())


def _require_root(spec: DataSpec) -> Path:
    root = Path(spec.root or "")
    if not spec.root or not root.is_dir():
        raise KdsearchError(
            f"data.root: {spec.root} is not a folder; {DATASETS[spec.name].root_holds} must be there (only CIFAR is fetched on first use)"
        )
    return root


def _cifar(spec: DataSpec, train: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR's training (or test) images as one uint8 (N, 3, 32, 32) tensor, their labels, and a
    hash of their content (the same CIFAR in two folders is one cache)."""
    from kdsearch.train.fetch import dataset_root, read_cifar

    data, targets = read_cifar(dataset_root(spec), spec.name, train)  # fetched on first use, once per node
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(targets, dtype=torch.long)
    return images, labels, content_hash(data, labels.numpy())[:16]


def load_cifar(spec: DataSpec) -> Data:
    """CIFAR's 50,000 training images, carved into train and val; its test set is `load_cifar_test`'s."""
    images, labels, content = _cifar(spec, True)
    info = DATASETS[spec.name]
    fp = fingerprint(name=spec.name, content=content)
    return in_memory_data(
        spec, images, labels, num_classes=info.num_classes, fingerprint=fp, mean=CIFAR_MEAN, std=CIFAR_STD
    )


def load_cifar_test(spec: DataSpec) -> Dataset:
    images, labels, _ = _cifar(spec, False)
    return in_memory_test(spec, images, labels, mean=CIFAR_MEAN, std=CIFAR_STD)


def _folder_transform(spec: DataSpec, augment: bool) -> ViewTransform:
    return ViewTransform(spec.img_size, IMAGENET_MEAN, IMAGENET_STD, augment=augment)


def load_imagefolder(spec: DataSpec) -> Data:
    """An image folder's train/, carved into train and val; its test split is `load_imagefolder_test`'s."""
    from torchvision.datasets import ImageFolder

    root = _require_root(spec)
    if not (root / "train").is_dir():
        raise KdsearchError(
            f"data.root: {root} has no train/ folder; an image folder needs train/ with one folder per class"
        )
    full = ImageFolder(str(root / "train"))  # the file list only: images are read by the loader's workers
    if spec.num_classes is not None and len(full.classes) != spec.num_classes:
        raise KdsearchError(
            f"data.num_classes: the space says {spec.num_classes} but {root / 'train'} has {len(full.classes)} class folders"
        )
    idx_train, idx_val = stratified(list(range(len(full.targets))), np.asarray(full.targets), spec.val_fraction)
    transform = _folder_transform(spec, spec.augment)
    train = FolderSplit([full.samples[i] for i in idx_train], transform)
    val = FolderSplit([full.samples[i] for i in idx_val], _folder_transform(spec, False))
    fp = fingerprint(
        name="imagefolder", root=str(root), n=len(full), classes=full.classes, val_fraction=spec.val_fraction,
        split_seed=SPLIT_SEED, **transform.key,
    )  # fmt: skip
    return Data(spec, train, val, len(full.classes), DATASETS[spec.name].in_chans, fp, random_augment=spec.augment)


def load_imagefolder_test(spec: DataSpec) -> Dataset:
    from torchvision.datasets import ImageFolder

    root = _require_root(spec)
    folder = root / "test" if (root / "test").is_dir() else root / "val"
    if not folder.is_dir():
        raise KdsearchError(f"data.root: {root} has neither test/ nor val/; the test split is read from one of them")
    test = ImageFolder(str(folder))
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if test.classes != classes:
        raise KdsearchError(f"data.root: {folder} has different class folders from {root / 'train'}")
    return FolderSplit(test.samples, _folder_transform(spec, False))


# --------------------------------------------------------------------------------------
# The held-out test split: read here only, every image counted
# --------------------------------------------------------------------------------------

_test_images_read = 0


def count_test_images_read() -> int:
    """Test-split images this process has read (through `read_test_batches`)."""
    return _test_images_read


@dataclass(frozen=True)
class DatasetLoaders:
    """How one dataset of kdsearch.space.datasets' table is read: its train and val splits (`Data`)
    and its held-out test split (a Dataset)."""

    train_val: Callable[[DataSpec], Data]
    test: Callable[[DataSpec], Dataset]


# NOTE: keyed as kdsearch.space.datasets.DATASETS (tests/test_objectives.py holds the names equal);
# the table states what a dataset is, this registry how it loads, so space/ never names train/.
LOADERS: dict[str, DatasetLoaders] = {
    "digits": DatasetLoaders(load_digits, load_digits_test),
    "cifar10": DatasetLoaders(load_cifar, load_cifar_test),
    "cifar100": DatasetLoaders(load_cifar, load_cifar_test),
    "imagefolder": DatasetLoaders(load_imagefolder, load_imagefolder_test),
    "hf": DatasetLoaders(
        lambda s: in_memory_data(s, **read_hf_train(s)), lambda s: in_memory_test(s, **read_hf_test(s))
    ),
}


def load_test(spec: DataSpec | object) -> Dataset:
    """The held-out test split of a space's (or a DataSpec's) dataset, by its loader in `LOADERS`.
    Only `eval`, `export` and `confirm` call this: a search never does."""
    if not isinstance(spec, DataSpec):
        spec = spec.data
    if spec.name not in DATASETS:
        raise KdsearchError(f"data.name: unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    return LOADERS[spec.name].test(spec)


def read_test_batches(test: Dataset, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """The test split's images in order, each one counted (and logged, with KDSEARCH_TEST_READ_LOG)."""
    global _test_images_read
    for batch in batches(test, torch.arange(len(test)), batch_size, workers):  # type: ignore[arg-type]
        n = len(batch[1])
        _test_images_read += n
        if os.environ.get(TEST_READ_LOG):
            with open(os.environ[TEST_READ_LOG], "a") as f:
                f.write(f"{os.getpid()} {n}\n")
        yield batch
