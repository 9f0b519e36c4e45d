"""The teacher's logits over the training set, computed once per search and read by every trial.

Keyed by a content hash of the teacher's weights and of the training images' identity and
transform, so a second search with the same teacher and data reuses them. Above
`TOPK_CLASSES` classes only the top-k logits are kept (TinyViT's sparse scheme).
Files are written to a temporary name and renamed: concurrent trials never read a torn cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdsearch.atomic import atomic_path
from kdsearch.space.specs import TeacherSpec
from kdsearch.train.data import Data
from kdsearch.train.teacher import run_teacher

TOPK_CLASSES = 100  # above this many classes the cache keeps the top-k logits only (TinyViT)
TOPK = 10


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
    h.update(json.dumps({"model": tspec.model, "pretrained": tspec.pretrained, "data": data.fingerprint}).encode())
    if tspec.checkpoint and Path(tspec.checkpoint).is_file():
        with open(tspec.checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def teacher_logits(
    teacher: nn.Module, data: Data, tspec: TeacherSpec, cache_dir: str | os.PathLike, batch_size: int = 256
) -> tuple[TeacherLogits, int]:
    """Read the cached logits, or compute them once and cache them.

    Returns the logits and how many images went through the teacher (0 on a cache hit).
    The files are written to a temporary name and renamed, so concurrent trials never
    read a torn cache.
    """
    key = cache_key(tspec, data)
    cache_dir = Path(cache_dir)
    sparse = data.num_classes > TOPK_CLASSES
    vpath = cache_dir / f"teacher-logits-{key}.values.npy"
    ipath = cache_dir / f"teacher-logits-{key}.indices.npy"
    if vpath.exists() and (not sparse or ipath.exists()):
        values = torch.from_numpy(np.load(vpath))
        indices = torch.from_numpy(np.load(ipath)) if sparse else None
        return TeacherLogits(values, indices, data.num_classes, key), 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher.to(device)
    chunks = []
    seen = 0
    for x, _, idx in data.train_batches_in_order(batch_size):
        assert int(idx[0]) == seen, "training images must come in index order"
        chunks.append(run_teacher(teacher, x.to(device)).logits.cpu())
        seen += len(idx)
    logits = torch.cat(chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if sparse:
        top = logits.topk(TOPK, dim=1)
        result = TeacherLogits(top.values.contiguous(), top.indices.to(torch.int32).contiguous(), data.num_classes, key)
        _save_npy(ipath, result.indices.numpy())
    else:
        result = TeacherLogits(logits, None, data.num_classes, key)
    _save_npy(vpath, result.values.numpy())
    return result, seen


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
