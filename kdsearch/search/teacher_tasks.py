"""The teacher's logits over the training set, computed once per search by Ray tasks.

The tasks ask for the space's accelerator (a GPU when trials use GPUs), so a CPU-only head
node is fine; each task loads the data on its own node, rebuilds the teacher from the weights
the driver ships (`ShippedTeacher`: no node needs the checkpoint file) and returns its shard.
The driver writes the cache under the storage root, content-addressed (teacher weights, data,
transform), so a second search with the same teacher and data reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ray

SHARD_IMAGES = 10_000  # a shard is at least this many images: below it, starting a task costs more than it saves


@ray.remote
def _logits_shard(shipped: Any, dspec: Any, start: int, stop: int) -> Any:
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import compute_logits

    return compute_logits(shipped.build(), load_data(dspec), start, stop).numpy()


def shard_bounds(num_images: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering the images: one per worker, each at least SHARD_IMAGES."""
    shards = max(1, min(workers, math.ceil(num_images / SHARD_IMAGES)))
    size = math.ceil(num_images / shards)
    return [(s, min(s + size, num_images)) for s in range(0, num_images, size)] or [(0, 0)]


def cached_teacher_logits(
    space: Any, data: Any, teacher: Any, cache: Any, gpus_per_trial: float, say: Callable[[str], None]
) -> Any:
    """The cache's logits for this teacher and data, computed by Ray tasks when missing."""
    import time

    import numpy as np
    import torch

    from kdsearch.train.logit_cache import cache_key, from_dense, read_cache, write_cache
    from kdsearch.train.teacher import ShippedTeacher

    key = cache_key(space.teacher, data)
    hit = read_cache(cache, key, data.num_classes)
    if hit is not None:
        say(f"teacher logits: reusing the cache {cache.uri_of()} ({key})")
        return hit
    t0 = time.perf_counter()
    use_gpu = gpus_per_trial > 0
    workers = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
    bounds = shard_bounds(data.num_train, workers)
    shipped = ray.put(ShippedTeacher.of(teacher, space, key))
    task = _logits_shard.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    shards = ray.get([task.remote(shipped, space.data, start, stop) for start, stop in bounds])
    logits = from_dense(torch.from_numpy(np.concatenate(shards)), data.num_classes, key)
    write_cache(cache, logits)
    say(
        f"teacher logits cached once for the search: {data.num_train:,} images by {len(bounds)} Ray task(s) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return logits
