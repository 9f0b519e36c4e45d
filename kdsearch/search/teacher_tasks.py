"""The teacher's logits over the training set, computed once per search by Ray tasks.

The tasks ask for the space's accelerator (a whole GPU each when trials use GPUs, even a
fraction of one), so they run only on nodes that declare GPUs and a CPU-only head is fine; each
task loads the data on its own node (once per worker process, kdsearch.search.worker_data; a
public archive is fetched there on first use), rebuilds the teacher from the weights the driver ships
(`ShippedTeacher`: no node needs the checkpoint file) and returns its shard with where it ran
(its node and Ray's GPU ids), which the driver's line names.
The driver writes the cache under the storage root, content-addressed (teacher weights, data,
transform), so a second search with the same teacher and data reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ray

from kdsearch.search.worker_data import worker_data

SHARD_IMAGES = 10_000  # a shard is at least this many images: below it, starting a task costs more than it saves


def _here() -> tuple[str, str]:
    """(node id, Ray's GPU ids joined by commas) of the task calling it."""
    return ray.get_runtime_context().get_node_id(), ",".join(str(i) for i in ray.get_gpu_ids())


def placed(places: list[tuple[str, str]]) -> str:
    """Where tasks ran, each node once by its id's first 12 digits (as kdsearch's lines name
    nodes) with the GPUs they had there: 'node 1a2b3c4d5e6f (GPU 0,1), node 0f9e8d7c6b5a'."""
    gpus: dict[str, set[str]] = {}
    for node, ids in places:
        gpus.setdefault(node[:12], set()).update(i for i in ids.split(",") if i)
    return ", ".join(f"node {n}" + (f" (GPU {','.join(sorted(g))})" if g else "") for n, g in gpus.items())


@ray.remote
def _logits_shard(shipped: Any, dspec: Any, start: int, stop: int) -> tuple[tuple[str, str], Any]:
    from kdsearch.train.logit_cache import compute_logits

    return _here(), compute_logits(shipped.build(), worker_data(dspec), start, stop).numpy()


def shard_bounds(num_images: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering the images: one per worker, each at least SHARD_IMAGES."""
    shards = max(1, min(workers, math.ceil(num_images / SHARD_IMAGES)))
    size = math.ceil(num_images / shards)
    return [(s, min(s + size, num_images)) for s in range(0, num_images, size)] or [(0, 0)]


def shipped_teacher(space: Any, data: Any, teacher: Any, teacher_space: Any = None) -> Any:
    """The teacher as it travels to the tasks, and its cache key. `teacher_space`: the space the
    teacher was loaded for, where `data` is at another resolution (`kdsearch study`): it keeps
    its input size (`ResizedInput`), and the key says so (its logits are not those of a teacher
    loaded at the data's resolution)."""
    from kdsearch.train.logit_cache import cache_key
    from kdsearch.train.teacher import ShippedTeacher

    key = cache_key(space.teacher, data)
    if teacher_space is None:
        return ShippedTeacher.of(teacher, space, key)
    size = int(teacher_space.data.img_size)
    return ShippedTeacher.of(teacher, teacher_space, f"{key}-fed{size}px", input_size=size)


def cached_teacher_logits(
    space: Any,
    data: Any,
    teacher: Any,
    cache: Any,
    gpus_per_trial: float,
    say: Callable[[str], None],
    teacher_space: Any = None,
) -> Any:
    """The cache's logits for this teacher and data, computed by Ray tasks when missing
    (`teacher_space`: as `shipped_teacher`'s)."""
    import time

    import numpy as np
    import torch

    from kdsearch.train.logit_cache import from_dense, read_cache, write_cache

    shipped_here = shipped_teacher(space, data, teacher, teacher_space)
    key = shipped_here.key
    hit = read_cache(cache, key, data.num_classes)
    if hit is not None:
        say(f"teacher logits: reusing the cache {cache.uri_of()} ({key})")
        return hit
    t0 = time.perf_counter()
    use_gpu = gpus_per_trial > 0
    workers = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
    bounds = shard_bounds(data.num_train, workers)
    shipped = ray.put(shipped_here)
    task = _logits_shard.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    places, shards = zip(*ray.get([task.remote(shipped, space.data, start, stop) for start, stop in bounds]))
    logits = from_dense(torch.from_numpy(np.concatenate(shards)), data.num_classes, key, space.teacher.cache_topk)
    write_cache(cache, logits)
    say(
        f"teacher logits cached once for the search: {data.num_train:,} images by {len(bounds)} Ray task(s) "
        f"on {placed(list(places))} in {time.perf_counter() - t0:.1f} s"
    )
    return logits


@ray.remote
def _views_shard(
    shipped: Any, dspec: Any, epochs: list[int], start: int, stop: int
) -> tuple[tuple[str, str], list[tuple[int, Any, Any]]]:
    from kdsearch.train.replay_cache import teacher_views

    teacher, data = shipped.build(), worker_data(dspec)
    out = []
    for epoch in epochs:
        seeds, logits = teacher_views(teacher, data, epoch, start, stop)
        out.append((epoch, seeds, logits.numpy()))
    return _here(), out


def cached_teacher_views(
    space: Any,
    data: Any,
    teacher: Any,
    cache: Any,
    gpus_per_trial: float,
    say: Callable[[str], None],
    teacher_space: Any = None,
) -> Any:
    """The replay cache (augmentation seed and teacher logits per image and epoch) for this
    teacher and data, up to the space's largest `train.epochs`; the epochs it lacks are
    computed by Ray tasks sharded over images and epochs and written epoch by epoch
    (`teacher_space`: as `shipped_teacher`'s)."""
    import time

    import numpy as np
    import torch

    from kdsearch.space.specs import replay_bytes_per_view
    from kdsearch.train.replay_cache import ReplayCache

    shipped_here = shipped_teacher(space, data, teacher, teacher_space)
    replay = ReplayCache(cache, shipped_here.key, data.num_classes, space.teacher.cache_topk)
    per_view = replay_bytes_per_view(data.num_classes, space.teacher.cache_topk)
    epochs = int(max(space.dims["train.epochs"].values()))
    missing = replay.missing(epochs)
    if not missing:
        say(f"teacher views: reusing the replay cache {cache.uri_of()} ({replay.key}, {epochs} epochs)")
        return replay
    size = data.num_train * len(missing) * per_view
    say(
        f"replay cache: {data.num_train:,} images x {len(missing)} epochs x {per_view} bytes "
        f"= {size / 1e6:.1f} MB, into {cache.uri_of()}"
    )
    t0 = time.perf_counter()
    use_gpu = gpus_per_trial > 0
    workers = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
    bounds = shard_bounds(data.num_train, workers)
    per_task = max(1, math.ceil(SHARD_IMAGES / max(1, bounds[0][1] - bounds[0][0])))
    chunks = [missing[i : i + per_task] for i in range(0, len(missing), per_task)]
    shipped = ray.put(shipped_here)
    task = _views_shard.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    pending = [[task.remote(shipped, space.data, chunk, start, stop) for start, stop in bounds] for chunk in chunks]
    places: list[tuple[str, str]] = []
    for chunk, refs in zip(chunks, pending):  # in epoch order: each epoch is written as soon as its shards are in
        where, shards = zip(*ray.get(refs))
        places.extend(where)
        for i, epoch in enumerate(chunk):
            seeds = np.concatenate([s[i][1] for s in shards])
            logits = torch.from_numpy(np.concatenate([s[i][2] for s in shards]))
            replay.write(epoch, seeds, logits)
    say(
        f"teacher views cached once for the search: {data.num_train * len(missing):,} (image, epoch) views by "
        f"{len(chunks) * len(bounds)} Ray task(s) on {placed(places)} in {time.perf_counter() - t0:.1f} s"
    )
    return replay
