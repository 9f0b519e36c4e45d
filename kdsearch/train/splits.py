"""`Data` (a train and a val split) and how its batches are made.

Every training batch carries the indices of its images, so a trial can look up the teacher's
cached logits for exactly those images. A split held in memory (it has `take`: digits'
`TensorSplit`, `kdsearch.train.memory_data.MemorySplit`) is batched in this process by
indexing, on the device `Data.place` put it on, with no DataLoader; any other split (an image
folder) goes through one DataLoader per trial whose workers persist across epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdsearch.space.specs import DataSpec

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, dataset indices
VIEW_SEED = 20_240_527  # the root of every image's augmentation seed; fixed, so every trial sees the same views
CPU = torch.device("cpu")


def view_seeds(epoch: int, num_images: int) -> np.ndarray:
    """The augmentation seed (4 bytes) of each training image at `epoch`: a fixed function of
    (epoch, image), so the view of an image at an epoch is the same in every trial, whatever
    its batch size or order, and the replay cache can store and replay it."""
    rng = np.random.default_rng(np.random.SeedSequence([VIEW_SEED, epoch]))
    return rng.integers(0, 2**32, num_images, dtype=np.uint32)


def cache_device(data: Data) -> torch.device:
    """Where a teacher's cache of `data` is computed: the data's device when it is CUDA (the
    trial's), else CUDA when torch sees one, else the CPU. Views are the same bit for bit on
    one kind of device; a cache and the trials that read it run on the same kind."""
    if data.device.type == "cuda":
        return data.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def in_memory(ds: Dataset) -> bool:
    """Whether a split is batched by indexing in this process (it has `take`)."""
    return hasattr(ds, "take")


@dataclass
class Data:
    """A train and a val split, and the device their batches are made on (`place`)."""

    spec: DataSpec
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    fingerprint: str  # identifies the exact training images and their transform (cache key)
    random_augment: bool  # the training view of an image changes with the epoch (a seeded augmentation)
    device: torch.device = CPU  # where in-memory images live and views are made (`place`)
    _loaders: dict = field(default_factory=dict, repr=False, compare=False)  # this process's training loaders

    def __getstate__(self) -> dict:
        # loaders (and their worker processes) and device copies stay in their process
        return {**self.__dict__, "_loaders": {}, "device": CPU}

    def place(self, device: torch.device | str) -> Data:
        """Make every batch on `device` from now on: in-memory images are copied there once per
        device (kept for the process), image folders decode there when it is CUDA. Returns self."""
        self.device = torch.device(device)
        for split in (self.train, self.val):
            if hasattr(split, "place"):
                split.place(self.device)
        return self

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def train_batches(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        workers: int = 0,
        seeds: np.ndarray | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[Batch]:
        """Shuffled training batches, the order fixed by (seed, epoch); with a random augmentation
        each image's view comes from its seed at this epoch (`seeds`, else `view_seeds(epoch)`).
        With `shard` = (rank, world), this process's share of each batch: every world-th image
        (an in-memory split makes only those views)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_train, generator=g)
        if self.random_augment and seeds is None:
            seeds = view_seeds(epoch, self.num_train)
        drop_last = self.num_train > batch_size
        rank, world = shard
        if in_memory(self.train):
            yield from batches(self.train, order, batch_size, workers, drop_last, seeds, self.device, shard)
            return
        key = (batch_size, workers, drop_last, str(self.device))
        if key not in self._loaders:  # one loader per trial: its workers persist across epochs
            sampler = EpochSampler()
            loader = DataLoader(
                self.train, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                collate_fn=getattr(self.train, "collate", None),
            )  # fmt: skip
            self._loaders[key] = (sampler, loader)
        sampler, loader = self._loaders[key]
        sampler.order, sampler.seeds = order.tolist(), seeds
        for batch in finished(self.train, loader):
            yield tuple(t[rank::world] for t in batch) if world > 1 else batch  # type: ignore[misc]

    def views(self, indices: np.ndarray | torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """The augmented training views of images `indices` with their `seeds` (replay): the
        very bits `train_batches` gives them, on `self.device`."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return self.train.views(idx, np.asarray(seeds, dtype=np.uint32), self.device)  # type: ignore[attr-defined]

    def val_batches(self, batch_size: int, workers: int = 0) -> Iterator[Batch]:
        yield from batches(self.val, torch.arange(len(self.val)), batch_size, workers, device=self.device)  # type: ignore[arg-type]

    def train_batches_in_order(
        self, batch_size: int, indices: range | None = None, workers: int = 0
    ) -> Iterator[Batch]:
        """Training images once each (all, or `indices`), in index order, with the deterministic (val) transform."""
        ds = getattr(self.train, "plain", self.train)
        order = torch.arange(self.num_train) if indices is None else torch.arange(indices.start, indices.stop)
        yield from batches(ds, order, batch_size, workers, device=self.device)


class TensorSplit(Dataset):
    """Float images and labels held as tensors (digits); indexing returns (image, label, index).
    `augment`, when given, makes each image's view from its seed: `augment(images, seeds)`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Callable | None = None):
        self.x, self.y, self.augment = x, y, augment
        self.plain = self if augment is None else TensorSplit(x, y)
        self._on: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on": {}}

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return self.x[i], self.y[i], torch.tensor(i)

    def images_on(self, device: torch.device) -> torch.Tensor:
        """The images on `device`, copied there once per process."""
        if device.type == "cpu":
            return self.x
        if str(device) not in self._on:
            self._on[str(device)] = self.x.to(device)
        return self._on[str(device)]

    def views(self, idx: torch.Tensor, seeds: np.ndarray | None, device: torch.device = CPU) -> torch.Tensor:
        """Images `idx` (their views from `seeds`, aligned with idx, when augmenting) on `device`."""
        x = self.images_on(device)[idx.to(device)]
        return x if self.augment is None or seeds is None else self.augment(x, seeds)

    def take(self, idx: torch.Tensor, seeds: np.ndarray | None = None, device: torch.device = CPU) -> Batch:
        """The batch of images `idx`; `seeds` is every training image's, indexed by idx."""
        return self.views(idx, None if seeds is None else seeds[idx.numpy()], device), self.y[idx], idx


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


def finished(ds: Any, loader: Any) -> Iterator[Batch]:
    """A loader's batches, each finished by the split where it finishes them (decoding on the device)."""
    finish = getattr(ds, "finish", None)
    for batch in loader:
        yield batch if finish is None else finish(batch)


def batches(
    ds: Dataset,
    order: torch.Tensor,
    batch_size: int,
    workers: int,
    drop_last: bool = False,
    seeds: np.ndarray | None = None,
    device: torch.device = CPU,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Batches of `ds` in `order`: by indexing for an in-memory split (no DataLoader, no
    per-item Python; with `shard` = (rank, world) every world-th image of each batch), else
    through a DataLoader of `workers` processes (seeds go with the items)."""
    if in_memory(ds):
        rank, world = shard
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield ds.take(order[start : start + batch_size][rank::world], seeds, device)  # type: ignore[attr-defined]
        return
    items = order.tolist() if seeds is None else [(i, int(seeds[i])) for i in order.tolist()]
    loader = DataLoader(
        ds, batch_size=batch_size, sampler=items, num_workers=workers, drop_last=drop_last,
        collate_fn=getattr(ds, "collate", None),
    )  # fmt: skip
    yield from finished(ds, loader)
