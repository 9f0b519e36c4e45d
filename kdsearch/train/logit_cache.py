"""The teacher's logits over the training set, computed once per search and read by every trial.

Keyed by a content hash of the teacher's weights and of the training images' identity and
transform, so a second search with the same teacher and data reuses them. Above
`SPARSE_ABOVE` classes only the top-k logits are kept (k: `teacher.cache_topk`) (TinyViT's sparse scheme).
The files live in a `kdsearch.storage.Storage` (a folder or a bucket) and are written whole, so
concurrent trials never read a torn cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdsearch.space.specs import SPARSE_ABOVE, TeacherSpec
from kdsearch.storage import Storage
from kdsearch.train.data import Data
from kdsearch.train.splits import cache_device
from kdsearch.train.teacher import run_teacher


@dataclass
class TeacherLogits:
    """The teacher's logits for every training image, dense or top-k sparse.

    Sparse rows keep the k largest logits; the other classes get that row's smallest kept
    logit, which keeps the top-k order and (at any temperature) gives each dropped class at
    most the probability of the least likely kept one.
    """

    values: Tensor  # (N, K) dense, or (N, k) top-k values
    indices: Tensor | None = None  # (N, k) class indices when sparse
    num_classes: int = 0
    key: str = ""

    def take(self, idx: Tensor) -> Tensor:
        """Dense (B, K) float32 logits of the training images with dataset indices `idx`."""
        vals = self.values[idx].float()
        if self.indices is None:
            return vals
        dense = vals.min(dim=1, keepdim=True).values.expand(-1, self.num_classes).clone()
        return dense.scatter_(1, self.indices[idx].long(), vals)


def cache_key(tspec: TeacherSpec, data: Data) -> str:
    """A content hash of the teacher's weights and the exact training images and transform."""
    h = hashlib.sha256()
    kept = tspec.cache_topk if data.num_classes > SPARSE_ABOVE else "all"
    h.update(
        json.dumps({"model": tspec.model, "pretrained": tspec.pretrained, "data": data.fingerprint, "k": kept}).encode()
    )
    if tspec.checkpoint and Path(tspec.checkpoint).is_file():
        with open(tspec.checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_cache(store: Storage, key: str, num_classes: int) -> TeacherLogits | None:
    """The logits cached under `key` in `store`, or None when they are not there (whole)."""
    names = _names(key)
    sparse = num_classes > SPARSE_ABOVE
    if not store.exists(names[0]) or (sparse and not store.exists(names[1])):
        return None
    values = torch.from_numpy(_load_npy(store.read_bytes(names[0])))
    indices = torch.from_numpy(_load_npy(store.read_bytes(names[1]))) if sparse else None
    return TeacherLogits(values, indices, num_classes, key)


def write_cache(store: Storage, logits: TeacherLogits) -> None:
    """Write the cache whole: the indices (when sparse) before the values a reader looks for."""
    values_name, indices_name = _names(logits.key)
    if logits.indices is not None:
        store.write_bytes(indices_name, _npy_bytes(logits.indices.numpy()))
    store.write_bytes(values_name, _npy_bytes(logits.values.numpy()))


@torch.no_grad()
def compute_logits(
    teacher: nn.Module, data: Data, start: int = 0, stop: int | None = None, batch_size: int = 256
) -> Tensor:
    """The teacher's dense logits (float32, on the CPU) of training images [start, stop), in
    index order, on their deterministic view; on the GPU when there is one."""
    device = cache_device(data)
    teacher, data = teacher.to(device), data.place(device)  # the plain views made on the device
    stop = data.num_train if stop is None else stop
    chunks = []
    for x, _, _ in data.train_batches_in_order(batch_size, range(start, stop)):
        chunks.append(run_teacher(teacher, x.to(device)).logits.cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, data.num_classes)


def from_dense(logits: Tensor, num_classes: int, key: str, topk: int = 10) -> TeacherLogits:
    """Dense logits as the cache keeps them: top-k sparse above SPARSE_ABOVE classes."""
    if num_classes <= SPARSE_ABOVE:
        return TeacherLogits(logits.contiguous(), None, num_classes, key)
    top = logits.topk(topk, dim=1)
    return TeacherLogits(top.values.contiguous(), top.indices.to(torch.int32).contiguous(), num_classes, key)


def teacher_logits(
    teacher: nn.Module, data: Data, tspec: TeacherSpec, cache: Storage | str | os.PathLike
) -> tuple[TeacherLogits, int]:
    """Read the cached logits, or compute them here once and cache them (a search computes them
    with Ray tasks instead: kdsearch.search.teacher_tasks).

    Returns the logits and how many images went through the teacher (0 on a cache hit).
    """
    store = cache if isinstance(cache, Storage) else Storage.open(cache)
    key = cache_key(tspec, data)
    hit = read_cache(store, key, data.num_classes)
    if hit is not None:
        return hit, 0
    result = from_dense(compute_logits(teacher, data), data.num_classes, key, tspec.cache_topk)
    write_cache(store, result)
    return result, data.num_train


def _names(key: str) -> tuple[str, str]:
    return f"teacher-logits-{key}.values.npy", f"teacher-logits-{key}.indices.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
