"""What a space holds: its dimensions, how many students, their FLOPs/params range and budget share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kdsearch.space import objectives
from kdsearch.space.dimensions import Choice, Fixed, FloatRange, IntRange, cardinality
from kdsearch.space.flops import count_flops
from kdsearch.space.search_space import SearchSpace, iter_architectures
from kdsearch.space.specs import TeacherSource, logit_bytes_per_image, replay_bytes_per_view


def summarize(space: SearchSpace, samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """A JSON-ready description of `space`.

    FLOPs and params ranges are exact over every architecture (float ranges at their ends,
    where the extremes lie); the budget share is measured on `samples` uniform random configs.
    """
    flops, params = [], []
    for student in iter_architectures(space):
        fc = count_flops(student)
        flops.append(fc.flops)
        params.append(fc.params)
    rng = np.random.default_rng(seed)
    inside = sum(space.budget.feasible(space.sample(rng).student) for _ in range(samples))
    n_arch = space.num_architectures()
    return {
        "name": space.name,
        "source": space.source,
        "description": space.description,
        "data": {
            "name": space.data.name,
            "img_size": space.data.img_size,
            "num_classes": space.data.num_classes,
            "root": space.data.root,
            "path": space.data.path,
        },
        "teacher": {
            "model": space.teacher.model,
            "checkpoint": space.teacher.checkpoint,
            "pretrained": space.teacher.pretrained,
        },
        "dimensions": [
            {"name": name, "kind": _kind(dim), "values": dim.describe(), "count": _count(dim), "default": dim.default}
            for name, dim in space.dims.items()
        ],
        "architectures": None if math.isinf(n_arch) else int(n_arch),
        "architectures_continuous": math.isinf(n_arch),
        "gflops": {"min": min(flops) / 1e9, "max": max(flops) / 1e9},
        "params": {"min": min(params), "max": max(params)},
        "flops_unit": "FLOPs per image at inference, 2 per multiply-add, attention matmuls included",
        "budget": {
            "max_gflops": space.budget.max_gflops,
            "max_params": space.budget.max_params,
            "share_inside": inside / samples,
            "samples": samples,
        },
        "objectives": [
            {"metric": name, "mode": mode, "unit": objectives.get(name).unit, "how": objectives.get(name).how}
            for name, mode in space.objectives
        ],
        "teacher_sources": sorted(s.value for s in space.teacher_sources()),
        "teacher_cache": _teacher_cache(space),
        "search": {"trials": space.search.trials, "sampler": space.search.sampler, "seed": space.search.seed},
        "resources": {"cpus": space.resources.cpus, "gpus": space.resources.gpus},
    }


def _kind(dim: Any) -> str:
    return {Fixed: "fixed", Choice: "choice", IntRange: "int", FloatRange: "float"}[type(dim)]


def _count(dim: Any) -> int | None:
    c = cardinality(dim)
    return None if math.isinf(c) else int(c)


def _teacher_cache(space: SearchSpace) -> dict[str, Any] | None:
    """What the teacher's cache will hold for this space, per training image (None: no trial reads it)."""
    if TeacherSource.CACHED not in space.teacher_sources():
        return None
    classes, k = space.data.num_classes or 0, space.teacher.cache_topk
    if not space.data.augment:
        return {"kind": "logits", "bytes_per_training_image": logit_bytes_per_image(classes, k)}
    epochs = int(max(space.dims["train.epochs"].values()))
    per_view = replay_bytes_per_view(classes, k)
    return {
        "kind": "replay",
        "bytes_per_view": per_view,
        "epochs": epochs,
        "bytes_per_training_image": per_view * epochs,
    }
