"""Datasets: scikit-learn's digits (bundled), CIFAR-10/100 and image folders from a local root.

Nothing is ever downloaded. Every training batch carries the indices of its images, so a
trial can look up the teacher's cached logits for exactly those images.

Three splits. `load_data` gives train and val, both carved from the dataset's training data
(stratified, seed `SPLIT_SEED`, independent of any trial's seed: every trial of a search is
measured on the same val images). The test split is never part of `Data`: only
`load_test` reads it (for `eval`, `export` and `confirm`), and it counts every test image read
(`count_test_images_read`; with KDSEARCH_TEST_READ_LOG set, each process also appends its reads to
that file), so "no search reads a test image" is checked, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import DataSpec

SPLIT_SEED = 0
TEST_READ_LOG = "KDSEARCH_TEST_READ_LOG"  # a file each process appends "pid images" to when it reads test images
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, dataset indices
VIEW_SEED = 20_240_527  # the root of every image's augmentation seed; fixed, so every trial sees the same views


def view_seeds(epoch: int, num_images: int) -> np.ndarray:
    """The augmentation seed (4 bytes) of each training image at `epoch`: a fixed function of
    (epoch, image), so the view of an image at an epoch is the same in every trial, whatever
    its batch size or order, and the replay cache can store and replay it."""
    rng = np.random.default_rng(np.random.SeedSequence([VIEW_SEED, epoch]))
    return rng.integers(0, 2**32, num_images, dtype=np.uint32)


@dataclass
class Data:
    """A train and a val split. In-memory splits (digits) are tensors; others are Datasets."""

    spec: DataSpec
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    fingerprint: str  # identifies the exact training images and their transform (cache key)
    random_augment: bool  # the training view of an image changes with the epoch (a seeded augmentation)
    _loaders: dict = field(default_factory=dict, repr=False, compare=False)  # this process's training loaders

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaders": {}}  # loaders (and their worker processes) stay in their process

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, workers: int = 0, seeds: np.ndarray | None = None
    ) -> Iterator[Batch]:
        """Shuffled training batches, the order fixed by (seed, epoch); with a random augmentation
        each image's view comes from its seed at this epoch (`seeds`, else `view_seeds(epoch)`)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_train, generator=g)
        if self.random_augment and seeds is None:
            seeds = view_seeds(epoch, self.num_train)
        drop_last = self.num_train > batch_size
        if isinstance(self.train, TensorSplit):
            yield from _batches(self.train, order, batch_size, workers, drop_last, seeds)
            return
        key = (batch_size, workers, drop_last)
        if key not in self._loaders:  # one loader per trial: its workers persist across epochs
            sampler = EpochSampler()
            loader = DataLoader(
                self.train, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            )  # fmt: skip
            self._loaders[key] = (sampler, loader)
        sampler, loader = self._loaders[key]
        sampler.order, sampler.seeds = order.tolist(), seeds
        yield from loader

    def views(self, indices: np.ndarray | torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """The augmented training views of images `indices` with their `seeds` (replay)."""
        idx = np.asarray(indices)
        if isinstance(self.train, TensorSplit):
            x = self.train.x[torch.as_tensor(idx)]
            return x if self.train.augment is None else self.train.augment(x, np.asarray(seeds))
        return torch.stack([self.train[(int(i), int(s))][0] for i, s in zip(idx, seeds)])

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
    """Images and labels held as tensors; indexing returns (image, label, index). `augment`,
    when given, makes each image's view from its seed: `augment(images, seeds)`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Callable | None = None):
        self.x, self.y, self.augment = x, y, augment
        self.plain = self if augment is None else TensorSplit(x, y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return self.x[i], self.y[i], torch.tensor(i)

    def take(self, idx: torch.Tensor, seeds: np.ndarray | None = None) -> Batch:
        x = self.x[idx]
        if self.augment is not None and seeds is not None:
            x = self.augment(x, seeds[idx.numpy()])
        return x, self.y[idx], idx


class EpochSampler(Sampler):
    """The training order of the current epoch, and each image's augmentation seed with it: it
    runs in the trial's process, so a persistent loader's workers get both with every index."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.seeds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        if self.seeds is None:
            return iter(self.order)
        return iter([(i, int(self.seeds[i])) for i in self.order])


class IndexedDataset(Dataset):
    """Wraps a torchvision dataset to also return the index; `plain` is the same images un-augmented.
    Image i's random transform draws from torch's RNG seeded with its seed: given with the index
    (`ds[(i, seed)]`, from an `EpochSampler`) or from `seeds`."""

    def __init__(self, ds: Dataset, plain: Dataset | None = None):
        self.ds = ds
        self.seeds: np.ndarray | None = None
        if plain is not None:
            self.plain = IndexedDataset(plain)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Batch:
        i, seed = item if isinstance(item, tuple) else (item, None if self.seeds is None else int(self.seeds[item]))
        if seed is None:
            x, y = self.ds[i]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x, y = self.ds[i]
        return x, torch.tensor(y), torch.tensor(i)


def _batches(
    ds: Dataset,
    order: torch.Tensor,
    batch_size: int,
    workers: int,
    drop_last: bool = False,
    seeds: np.ndarray | None = None,
) -> Iterator[Batch]:
    if isinstance(ds, TensorSplit):  # the fast path: no DataLoader, no per-item Python
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield ds.take(order[start : start + batch_size], seeds)
        return
    if isinstance(ds, IndexedDataset):
        ds.seeds = seeds  # the loader's workers get this epoch's seeds with the dataset
    loader = DataLoader(ds, batch_size=batch_size, sampler=order.tolist(), num_workers=workers, drop_last=drop_last)
    yield from loader


def shift_and_rotate(
    x: torch.Tensor, seeds: np.ndarray, max_shift: float = 2.0, max_degrees: float = 12.0
) -> torch.Tensor:
    """Digits' augmentation: each image shifted by up to `max_shift` pixels and rotated by up to
    `max_degrees`, its parameters drawn from its own seed. The sampling grid is built with
    elementwise operations only, so an image's view is the same bit for bit in any batch."""
    b, _, h, w = x.shape
    params = np.array([np.random.default_rng(int(s)).uniform(-1, 1, 3) for s in seeds], dtype=np.float64)
    angle = torch.tensor(params[:, 0] * math.radians(max_degrees), dtype=x.dtype).view(b, 1, 1)
    tx = torch.tensor(params[:, 1] * 2 * max_shift / w, dtype=x.dtype).view(b, 1, 1)
    ty = torch.tensor(params[:, 2] * 2 * max_shift / h, dtype=x.dtype).view(b, 1, 1)
    ys, xs = torch.meshgrid(
        (torch.arange(h, dtype=x.dtype) * 2 + 1) / h - 1,
        (torch.arange(w, dtype=x.dtype) * 2 + 1) / w - 1,
        indexing="ij",
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    gx = cos * xs - sin * ys + tx
    gy = sin * xs + cos * ys + ty
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_data(spec: DataSpec | object) -> Data:
    """The data a space (or a DataSpec) names, by its loader in `LOADERS`.
    Raises KdsearchError on an unknown name or a missing root."""
    if not isinstance(spec, DataSpec):
        spec = spec.data  # a SearchSpace or a TrialSpec
    if spec.name not in DATASETS:
        raise KdsearchError(f"data.name: unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    return LOADERS[spec.name].train_val(spec)


def _fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    rest, test = _stratified(list(range(len(y))), digits.target, spec.test_fraction)
    train, val = _stratified(rest, digits.target[rest], spec.val_fraction)
    return x, y, {"train": train, "val": val, "test": test}


def _stratified(indices: list[int], labels: np.ndarray, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, carved): `fraction` of `indices` carved out, stratified by label, fixed by SPLIT_SEED."""
    from sklearn.model_selection import train_test_split

    kept, carved = train_test_split(indices, test_size=fraction, stratify=labels, random_state=SPLIT_SEED)
    return list(kept), list(carved)


def load_digits(spec: DataSpec) -> Data:
    x, y, split = _digits(spec)
    idx_train, idx_val = split["train"], split["val"]
    train = TensorSplit(
        x[idx_train].contiguous(), y[idx_train].contiguous(), shift_and_rotate if spec.augment else None
    )
    val = TensorSplit(x[idx_val].contiguous(), y[idx_val].contiguous())
    fp = _fingerprint(
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


def _carve(spec: DataSpec, train: Dataset, plain: Dataset, targets: list[int]) -> tuple[Dataset, Dataset]:
    """Train and val carved from a torchvision training set: val is data.val_fraction of it
    (stratified, fixed), with the deterministic transform; both index 0..n-1 of their own."""
    from torch.utils.data import Subset

    idx_train, idx_val = _stratified(list(range(len(targets))), np.asarray(targets), spec.val_fraction)
    return (
        IndexedDataset(Subset(train, idx_train), Subset(plain, idx_train)),
        IndexedDataset(Subset(plain, idx_val)),
    )


def _cifar(spec: DataSpec, train: bool, transform: Any) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if spec.name == "cifar10" else (CIFAR100, "cifar-100-python")
    from kdsearch.train.fetch import dataset_root

    root = dataset_root(spec)  # fetched into the per-user cache (or data.root) on first use, once per node
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except RuntimeError:
        raise KdsearchError(
            f"data.root: {root} holds no {spec.name} files; expected {root / folder}/ (kdsearch never downloads)"
        ) from None


def load_cifar(spec: DataSpec) -> Data:
    """CIFAR's 50,000 training images, carved into train and val; its test set is `load_cifar_test`'s."""
    info = DATASETS[spec.name]
    train_tf, plain_tf = _transforms(spec, 32, CIFAR_MEAN, CIFAR_STD)
    full, plain = _cifar(spec, True, train_tf), _cifar(spec, True, plain_tf)
    train, val = _carve(spec, full, plain, list(full.targets))
    fp = _fingerprint(
        name=spec.name, root=str(spec.root), img_size=spec.img_size, n=len(full), val_fraction=spec.val_fraction,
        split_seed=SPLIT_SEED,
    )  # fmt: skip
    return Data(spec, train, val, info.num_classes, info.in_chans, fp, random_augment=spec.augment)


def load_cifar_test(spec: DataSpec) -> Dataset:
    _, plain_tf = _transforms(spec, 32, CIFAR_MEAN, CIFAR_STD)
    return IndexedDataset(_cifar(spec, False, plain_tf))


def load_imagefolder(spec: DataSpec) -> Data:
    """An image folder's train/, carved into train and val; its test split is `load_imagefolder_test`'s."""
    from torchvision.datasets import ImageFolder

    root = _require_root(spec)
    if not (root / "train").is_dir():
        raise KdsearchError(
            f"data.root: {root} has no train/ folder; an image folder needs train/ with one folder per class"
        )
    train_tf, plain_tf = _transforms(spec, -1, IMAGENET_MEAN, IMAGENET_STD)
    full = ImageFolder(str(root / "train"), transform=train_tf)
    plain = ImageFolder(str(root / "train"), transform=plain_tf)
    if spec.num_classes is not None and len(full.classes) != spec.num_classes:
        raise KdsearchError(
            f"data.num_classes: the space says {spec.num_classes} but {root / 'train'} has {len(full.classes)} class folders"
        )
    train, val = _carve(spec, full, plain, list(full.targets))
    fp = _fingerprint(
        name="imagefolder", root=str(root), img_size=spec.img_size, n=len(full), classes=full.classes,
        val_fraction=spec.val_fraction, split_seed=SPLIT_SEED,
    )  # fmt: skip
    return Data(spec, train, val, len(full.classes), DATASETS[spec.name].in_chans, fp, random_augment=spec.augment)


def load_imagefolder_test(spec: DataSpec) -> Dataset:
    from torchvision.datasets import ImageFolder

    root = _require_root(spec)
    folder = root / "test" if (root / "test").is_dir() else root / "val"
    if not folder.is_dir():
        raise KdsearchError(f"data.root: {root} has neither test/ nor val/; the test split is read from one of them")
    _, plain_tf = _transforms(spec, -1, IMAGENET_MEAN, IMAGENET_STD)
    test = ImageFolder(str(folder), transform=plain_tf)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if test.classes != classes:
        raise KdsearchError(f"data.root: {folder} has different class folders from {root / 'train'}")
    return IndexedDataset(test)


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
    for batch in _batches(test, torch.arange(len(test)), batch_size, workers):  # type: ignore[arg-type]
        n = len(batch[1])
        _test_images_read += n
        if os.environ.get(TEST_READ_LOG):
            with open(os.environ[TEST_READ_LOG], "a") as f:
                f.write(f"{os.getpid()} {n}\n")
        yield batch
