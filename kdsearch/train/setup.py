"""What a trial needs besides its spec: one `TrialSetup`, built once by its caller (the CLI,
a search's trainable, `kdsearch confirm`, a test or a notebook) and handed whole to
`kdsearch.train.trial.run_trial`, which hands it on to every process of a data-parallel
trial. A new training input is one field here and its use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdsearch.space.objectives import Objective
from kdsearch.train.data import Data
from kdsearch.train.logit_cache import TeacherLogits
from kdsearch.train.replay_cache import ReplayCache

# report(metrics) after every epoch, or report(metrics, checkpoint=folder) on a checkpoint epoch
Report = Callable[..., None]


def quiet(line: str) -> None:
    """A log that drops its lines (`TrialSetup.log`'s default)."""


@dataclass(frozen=True, kw_only=True)
class TrialSetup:
    """Where a trial writes, what it is given and how it runs.

    Attributes:
        workdir: The folder the student's files are saved to (and checkpoint folders written
            in, under `checkpoint/`); created when missing.
        data: The dataset, loaded once per worker by a search; None: loaded from the spec.
        teacher: The teacher, loaded by the caller; None: loaded from the spec when it must run
            (live, or to fill a cache the setup does not carry).
        cached_logits: The teacher's cache: a `TeacherLogits`, or a `ReplayCache` when the
            data's augmentation is random; None: read from or written once to `cache_dir`.
        cache_dir: Where that cache is read or written when not given (default `workdir/cache`).
        live_teacher: Run the teacher on every batch even where its cache would do (a baseline).
        device: The device it trains on; None: `trial_device()` (CUDA when torch sees it).
            A data-parallel trial gives each process a device of its own.
        loader_workers: DataLoader processes for datasets read from disk (in-memory ones need none).
        objectives: The run's objectives; the measured ones among them are measured after each epoch.
        world_size: Processes training it: > 1 trains data-parallel (kdsearch.train.parallel).
        checkpoint_every: > 0 hands a checkpoint folder with every k-th epoch's report.
        resume_from: A checkpoint folder of the same spec to continue from.
        init_state: Weights the student starts from instead of its seeded init (`kdsearch study`'s
            fine-tuning: a trained student carried to another resolution); `resume_from` wins.
        log: Where the teacher's loading and training say what they do.
    """

    workdir: Path
    data: Data | None = None
    teacher: nn.Module | None = None
    cached_logits: TeacherLogits | ReplayCache | None = None
    cache_dir: Path | None = None
    live_teacher: bool = False
    device: torch.device | None = None
    loader_workers: int = 0
    objectives: Sequence[Objective] = ()
    world_size: int = 1
    checkpoint_every: int = 0
    resume_from: Path | None = None
    init_state: dict[str, torch.Tensor] | None = None
    log: Callable[[str], None] = quiet

    def __post_init__(self) -> None:
        # paths and devices may be given as strings; each field holds one type
        paths = {"workdir": self.workdir, "cache_dir": self.cache_dir, "resume_from": self.resume_from}
        for name, value in paths.items():
            if isinstance(value, (str, os.PathLike)):
                object.__setattr__(self, name, Path(value))
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "objectives", tuple(self.objectives))

    @property
    def teacher_cache_dir(self) -> Path:
        """Where the teacher's cache is read or written when the setup does not carry it."""
        return self.cache_dir if self.cache_dir is not None else self.workdir / "cache"
