"""Datasets that fit in memory (CIFAR, small Hugging Face sets): one uint8 (N, C, H, W) tensor at
its native size, copied once per process to the device that trains on it, where each batch's
views are made (`kdsearch.train.augment.ViewTransform`: resized to `img_size`, augmented from
each image's seed, normalized).

Train and val are carved from the dataset's training images (stratified, `SPLIT_SEED`); val and
the test split get the plain view.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdsearch.errors import KdsearchError
from kdsearch.space.specs import DataSpec
from kdsearch.train.augment import ViewTransform
from kdsearch.train.splits import CPU, Batch, Data

SPLIT_SEED = 0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def content_hash(pixels: np.ndarray, labels: np.ndarray) -> str:
    """The sha256 (hex) of the images' bytes then the labels' bytes, read in place (no copy)."""
    content = hashlib.sha256(np.ascontiguousarray(pixels).data)
    content.update(np.ascontiguousarray(labels).data)
    return content.hexdigest()


def fingerprint(**parts: object) -> str:
    """A short content hash of `parts` (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stratified(indices: list[int], labels: np.ndarray, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, carved): `fraction` of `indices` carved out, stratified by label, fixed by SPLIT_SEED."""
    from sklearn.model_selection import train_test_split

    kept, carved = train_test_split(indices, test_size=fraction, stratify=labels, random_state=SPLIT_SEED)
    return list(kept), list(carved)


class MemorySplit(Dataset):
    """uint8 images (N, C, H, W) and int64 labels; batches are made by `take` on the device the
    split is placed on (its images copied there once, shared with `plain`). Indexing one item
    gives its plain view (for a DataLoader)."""

    def __init__(self, x: Tensor, y: Tensor, transform: ViewTransform, on: dict | None = None):
        self.x, self.y, self.transform = x, y, transform
        self._on: dict[str, Tensor] = {} if on is None else on  # device -> the images there
        self.plain = self if not transform.augment else MemorySplit(x, y, _plain(transform), self._on)

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_on": {}}
        state["plain"] = None if self.plain is self else self.plain
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.plain is None:
            self.plain = self
        else:
            self.plain._on = self._on

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Batch:
        return self.transform.view_of(self.x[i]), self.y[i], torch.tensor(i)

    def place(self, device: torch.device) -> None:
        """Copy the images to `device` now (once per process and device)."""
        self.images_on(device)

    def images_on(self, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return self.x
        if str(device) not in self._on:
            self._on[str(device)] = self.x.to(device)
        return self._on[str(device)]

    def views(self, idx: Tensor, seeds: np.ndarray | None, device: torch.device = CPU) -> Tensor:
        """The views of images `idx` on `device` (augmented from `seeds`, aligned with idx, when given)."""
        return self.transform.views(self.images_on(device)[idx.to(device)], seeds)

    def take(self, idx: Tensor, seeds: np.ndarray | None = None, device: torch.device = CPU) -> Batch:
        """The batch of images `idx`; `seeds` is every training image's, indexed by idx."""
        return self.views(idx, None if seeds is None else seeds[idx.numpy()], device), self.y[idx], idx


def _plain(transform: ViewTransform) -> ViewTransform:
    return ViewTransform(transform.size, transform.mean, transform.std, augment=False)


def _checked(images: Tensor, labels: Tensor, mean: tuple, std: tuple, where: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise KdsearchError(f"{where}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(labels) != len(images):
        raise KdsearchError(f"{where}: {len(images)} images but {len(labels)} labels")
    if not len(mean) == len(std) == images.shape[1]:
        raise KdsearchError(f"{where}: mean and std need one value per channel ({images.shape[1]})")


def in_memory_data(
    spec: DataSpec,
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    fingerprint: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Data:
    """Train and val of an in-memory dataset: val carved from `images` (data.val_fraction,
    stratified, SPLIT_SEED), views resized to data.img_size, normalized and (data.augment)
    augmented batched on the trial's device from each image's seed.

    Args:
        spec: The space's data section.
        images: uint8 (N, C, H, W), one size for all: the dataset's training images.
        labels: int64 (N,).
        num_classes: The classes the labels index.
        fingerprint: What identifies the images (their content where cheap); the split and the
            transform are added here.
        mean, std: Per channel, of images scaled to [0, 1].

    Returns:
        The Data; its fingerprint changes with the images, the split and the views.
    """
    _checked(images, labels, mean, std, f"data ({spec.name})")
    labels = torch.as_tensor(labels, dtype=torch.long)
    keep, val = stratified(list(range(len(labels))), labels.numpy(), spec.val_fraction)
    transform = ViewTransform(spec.img_size, tuple(mean), tuple(std), augment=spec.augment)
    keep_t, val_t = torch.tensor(keep), torch.tensor(val)
    train = MemorySplit(images[keep_t].contiguous(), labels[keep_t].contiguous(), transform)
    held = MemorySplit(images[val_t].contiguous(), labels[val_t].contiguous(), _plain(transform))
    fp = _data_fingerprint(fingerprint, spec, len(labels), transform)
    return Data(spec, train, held, num_classes, images.shape[1], fp, random_augment=spec.augment)


def _data_fingerprint(base: str, spec: DataSpec, n: int, transform: ViewTransform) -> str:
    parts = {"images": base, "n": n, "val_fraction": spec.val_fraction, "split_seed": SPLIT_SEED, **transform.key}
    return fingerprint(**parts)


def in_memory_test(
    spec: DataSpec, images: Tensor, labels: Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> Dataset:
    """The held-out test split of an in-memory dataset: every image, the plain view at
    data.img_size (read through `kdsearch.train.data.read_test_batches`)."""
    _checked(images, labels, mean, std, f"data ({spec.name}) test split")
    transform = ViewTransform(spec.img_size, tuple(mean), tuple(std))
    return MemorySplit(images.contiguous(), torch.as_tensor(labels, dtype=torch.long).contiguous(), transform)
