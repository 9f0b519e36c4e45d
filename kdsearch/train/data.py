"""Datasets: scikit-learn's digits (bundled), CIFAR-10/100 and image folders from a local root.

Nothing is ever downloaded. Every training batch carries the indices of its images, so a
trial can look up the teacher's cached logits for exactly those images.

The train/val split of digits is fixed (stratified, seed `SPLIT_SEED`) and does not depend on
a trial's seed: every trial of a search is measured on the same validation images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import DataSpec

SPLIT_SEED = 0
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, dataset indices


@dataclass
class Data:
    """A train and a val split. In-memory splits (digits) are tensors; others are Datasets."""

    spec: DataSpec
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    fingerprint: str  # identifies the exact training images and their transform (cache key)
    random_augment: bool  # the training transform is random: the teacher must see each view live

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def train_batches(self, batch_size: int, epoch: int, seed: int, workers: int = 0) -> Iterator[Batch]:
        """Shuffled training batches, the order fixed by (seed, epoch)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_train, generator=g)
        yield from _batches(self.train, order, batch_size, workers, drop_last=self.num_train > batch_size)

    def val_batches(self, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        yield from _batches(self.val, torch.arange(len(self.val)), batch_size, workers)  # type: ignore[arg-type]

    def train_batches_in_order(
        self, batch_size: int, indices: range | None = None, workers: int = 0
    ) -> Iterator[Batch]:
        """Training images once each (all, or `indices`), in index order, with the deterministic (val) transform."""
        ds = getattr(self.train, "plain", self.train)
        order = torch.arange(self.num_train) if indices is None else torch.arange(indices.start, indices.stop)
        yield from _batches(ds, order, batch_size, workers)


class TensorSplit(Dataset):
    """Images and labels held as tensors; indexing returns (image, label, index)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return self.x[i], self.y[i], torch.tensor(i)

    def take(self, idx: torch.Tensor) -> Batch:
        return self.x[idx], self.y[idx], idx


class IndexedDataset(Dataset):
    """Wraps a torchvision dataset to also return the index; `plain` is the same images un-augmented."""

    def __init__(self, ds: Dataset, plain: Dataset | None = None):
        self.ds = ds
        if plain is not None:
            self.plain = IndexedDataset(plain)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Batch:
        x, y = self.ds[i]
        return x, torch.tensor(y), torch.tensor(i)


def _batches(
    ds: Dataset, order: torch.Tensor, batch_size: int, workers: int, drop_last: bool = False
) -> Iterator[Batch]:
    if isinstance(ds, TensorSplit):  # the fast path: no DataLoader, no per-item Python
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield ds.take(order[start : start + batch_size])
        return
    loader = DataLoader(ds, batch_size=batch_size, sampler=order.tolist(), num_workers=workers, drop_last=drop_last)
    yield from loader


def load_data(spec: DataSpec | object) -> Data:
    """The data a space (or a DataSpec) names, by its loader in kdsearch.space.datasets' table.
    Raises KdsearchError on an unknown name or a missing root."""
    if not isinstance(spec, DataSpec):
        spec = spec.data  # a SearchSpace or a TrialSpec
    if spec.name not in DATASETS:
        raise KdsearchError(f"data.name: unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[spec.name].load_function()(spec)


def _fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_digits(spec: DataSpec) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    if spec.img_size != 8:
        x = F.interpolate(x, size=(spec.img_size, spec.img_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    idx_train, idx_val = train_test_split(
        range(len(y)), test_size=spec.val_fraction, stratify=digits.target, random_state=SPLIT_SEED
    )
    train = TensorSplit(x[idx_train].contiguous(), y[idx_train].contiguous())
    val = TensorSplit(x[idx_val].contiguous(), y[idx_val].contiguous())
    fp = _fingerprint(
        name="digits", img_size=spec.img_size, val_fraction=spec.val_fraction, split_seed=SPLIT_SEED, n=len(y)
    )
    return Data(spec, train, val, 10, DATASETS["digits"].in_chans, fp, random_augment=False)


def _require_root(spec: DataSpec) -> Path:
    root = Path(spec.root or "")
    if not spec.root or not root.is_dir():
        raise KdsearchError(
            f"data.root: {spec.root} is not a folder; {DATASETS[spec.name].root_holds} must be there (kdsearch never downloads)"
        )
    return root


def _transforms(spec: DataSpec, native: int, mean: tuple, std: tuple):
    from torchvision import transforms as T

    size = spec.img_size
    resize = [T.Resize(size, antialias=True)] if size != native else []
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    plain = T.Compose(resize + ([T.CenterCrop(size)] if native != size else []) + norm)
    if not spec.augment:
        return plain, plain
    if size <= 64:
        aug = T.Compose(resize + [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()] + norm)
    else:
        aug = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()] + norm)
    return aug, plain


def load_cifar(spec: DataSpec) -> Data:
    from torchvision.datasets import CIFAR10, CIFAR100

    info = DATASETS[spec.name]
    cls, folder = (CIFAR10, "cifar-10-batches-py") if spec.name == "cifar10" else (CIFAR100, "cifar-100-python")
    root = _require_root(spec)
    train_tf, plain_tf = _transforms(spec, 32, CIFAR_MEAN, CIFAR_STD)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=False)
        plain = cls(str(root), train=True, transform=plain_tf, download=False)
        val = cls(str(root), train=False, transform=plain_tf, download=False)
    except RuntimeError:
        raise KdsearchError(
            f"data.root: {root} holds no {spec.name} files; expected {root / folder}/ (kdsearch never downloads)"
        ) from None
    fp = _fingerprint(name=spec.name, root=str(root), img_size=spec.img_size, n=len(train))
    return Data(
        spec,
        IndexedDataset(train, plain),
        IndexedDataset(val),
        info.num_classes,
        info.in_chans,
        fp,
        random_augment=spec.augment,
    )


def load_imagefolder(spec: DataSpec) -> Data:
    from torchvision.datasets import ImageFolder

    root = _require_root(spec)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KdsearchError(
                f"data.root: {root} has no {split}/ folder; an image folder needs train/ and val/ with one folder per class"
            )
    train_tf, plain_tf = _transforms(spec, -1, IMAGENET_MEAN, IMAGENET_STD)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    plain = ImageFolder(str(root / "train"), transform=plain_tf)
    val = ImageFolder(str(root / "val"), transform=plain_tf)
    if spec.num_classes is not None and len(train.classes) != spec.num_classes:
        raise KdsearchError(
            f"data.num_classes: the space says {spec.num_classes} but {root / 'train'} has {len(train.classes)} class folders"
        )
    if val.classes != train.classes:
        raise KdsearchError(f"data.root: {root}/val has different class folders from {root}/train")
    fp = _fingerprint(name="imagefolder", root=str(root), img_size=spec.img_size, n=len(train), classes=train.classes)
    return Data(
        spec,
        IndexedDataset(train, plain),
        IndexedDataset(val),
        len(train.classes),
        DATASETS[spec.name].in_chans,
        fp,
        random_augment=spec.augment,
    )
