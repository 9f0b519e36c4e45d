"""The data a search's Ray workers train on: what travels to them, and each worker process's copy.

Data read from files (a dataset that needs `data.root`, or one with a public archive) travels as
its `DataSpec`: each worker process (a trial, a confirmation's retraining, a teacher-cache task)
loads it itself, once per process (`worker_data`), so a public archive is fetched on first use
by the node that reads it (kdsearch.train.fetch: once per node, under a file lock) and no
node receives the driver's decoded images through the object store. In-memory data (digits:
bundled, small) travels loaded. The driver still loads the data once for its own checks (the
fingerprint the caches are keyed by, the class count); every loader is deterministic, so a
worker's copy is the driver's.
"""

from __future__ import annotations

import functools
from typing import Any

from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import DataSpec


def reads_files(spec: DataSpec) -> bool:
    """Whether `spec`'s dataset is read from files (a root, or an archive fetched into one)."""
    info = DATASETS[spec.name]
    return info.needs_root or info.archive is not None


def shipped(data: Any) -> Any:
    """What travels to the workers for the loaded `data` (a kdsearch.train.data.Data): its
    DataSpec when it is read from files, else the data itself (None stays None)."""
    if data is None or not reads_files(data.spec):
        return data
    return data.spec


def worker_data(travelled: Any) -> Any:
    """The `Data` a worker trains on, from what travelled (`shipped`): a DataSpec is loaded here,
    once per process (the latest one kept: a worker serves one search at a time).

    Raises:
        KdsearchError: the data cannot be loaded on this node (a missing root, an archive that
            cannot be fetched).
    """
    if isinstance(travelled, DataSpec):
        return _load(travelled)
    return travelled


@functools.lru_cache(maxsize=1)
def _load(spec: DataSpec) -> Any:
    from kdsearch.train.data import load_data

    return load_data(spec)
