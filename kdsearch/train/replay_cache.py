"""The teacher once per search under random augmentation: a cache that replays the views.

For each training epoch and each training image it stores the view's augmentation seed
(4 bytes) and the teacher's logits of that view: dense fp16 when the classes are few, else
the top-k as (fp16 value, int16 index) pairs (TinyViT's scheme). A trial rebuilds exactly that
view from the stored seed (kdsearch.train.data: a seeded, batch-independent augmentation), so
teacher and student see the same image ("consistent teaching") whatever the trial's batch
size or order. One file per epoch, content-addressed by the teacher's weights and the data:
a search that trains longer computes only the epochs it lacks, and a trial reads one epoch at
a time, never the whole cache.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kdsearch.space.specs import SPARSE_ABOVE
from kdsearch.storage import Storage
from kdsearch.train.data import Data, view_seeds
from kdsearch.train.logit_cache import TeacherLogits
from kdsearch.train.splits import cache_device
from kdsearch.train.teacher import run_teacher


@dataclass(frozen=True)
class ReplayEpoch:
    seeds: np.ndarray  # (N,) uint32: each image's augmentation seed at this epoch
    logits: TeacherLogits  # the teacher's logits of those views


@dataclass(frozen=True)
class ReplayCache:
    """The replay cache of one teacher and data in a storage (a folder or a bucket prefix)."""

    store: Storage
    key: str  # the teacher-and-data content key (kdsearch.train.logit_cache.cache_key)
    num_classes: int
    topk: int = 10  # logits kept per view when sparse (teacher.cache_topk)

    @property
    def sparse(self) -> bool:
        return self.num_classes > SPARSE_ABOVE

    def name(self, epoch: int) -> str:
        return f"teacher-replay-{self.key}/epoch-{epoch:04d}.npz"

    def has(self, epoch: int) -> bool:
        return self.store.exists(self.name(epoch))

    def missing(self, epochs: int) -> list[int]:
        return [e for e in range(epochs) if not self.has(e)]

    def read(self, epoch: int) -> ReplayEpoch:
        if not self.has(epoch):
            raise FileNotFoundError(f"{self.store.uri_of(self.name(epoch))}: the replay cache has no epoch {epoch}")
        with np.load(io.BytesIO(self.store.read_bytes(self.name(epoch))), allow_pickle=False) as f:
            seeds, values = f["seeds"], torch.from_numpy(f["values"].astype(np.float32))
            indices = torch.from_numpy(f["indices"].astype(np.int64)) if "indices" in f else None
        return ReplayEpoch(seeds, TeacherLogits(values, indices, self.num_classes, self.key))

    def write(self, epoch: int, seeds: np.ndarray, logits: Tensor) -> int:
        """Store one epoch (dense logits in, sparse or dense fp16 out); returns its bytes."""
        arrays = {"seeds": seeds.astype(np.uint32)}
        if self.sparse:
            top = logits.topk(self.topk, dim=1)
            arrays.update(values=top.values.half().numpy(), indices=top.indices.to(torch.int16).numpy())
        else:
            arrays["values"] = logits.half().numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.store.write_bytes(self.name(epoch), buffer.getvalue())
        return len(buffer.getvalue())


@torch.no_grad()
def teacher_views(
    teacher: nn.Module, data: Data, epoch: int, start: int = 0, stop: int | None = None, batch_size: int = 256
) -> tuple[np.ndarray, Tensor]:
    """The seeds of training images [start, stop) at `epoch` and the teacher's dense float32
    logits of their augmented views (on the GPU when there is one), in index order."""
    device = cache_device(data)
    teacher, data = teacher.to(device), data.place(device)  # the views made on the device, as a trial makes them
    stop = data.num_train if stop is None else stop
    seeds = view_seeds(epoch, data.num_train)[start:stop]
    chunks = []
    for first in range(start, stop, batch_size):
        idx = np.arange(first, min(first + batch_size, stop))
        chunks.append(run_teacher(teacher, data.views(idx, seeds[idx - start]).to(device)).logits.cpu())
    return seeds, torch.cat(chunks) if chunks else torch.zeros(0, data.num_classes)


def build_replay_cache(teacher: nn.Module, data: Data, cache: ReplayCache, epochs: int) -> int:
    """Fill the epochs the cache lacks, here (a search uses Ray tasks instead:
    kdsearch.search.teacher_tasks). Returns how many views the teacher ran on."""
    ran = 0
    for epoch in cache.missing(epochs):
        seeds, logits = teacher_views(teacher, data, epoch)
        cache.write(epoch, seeds, logits)
        ran += len(seeds)
    return ran
