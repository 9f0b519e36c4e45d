"""One trial: data -> teacher signal -> student -> distillation loop -> a report per epoch.

`run_trial(spec, setup, report)` knows nothing of Ray: it calls `report(metrics)` after every
epoch, so the same function runs under Ray Tune (the report is `ray.tune.report`), in a test
(a list's `append`) or in a notebook. What it is given besides its spec is one `TrialSetup`
(kdsearch.train.setup). Where the teacher's signal comes from (none, the once-per-search cache,
or the teacher live) is `kdsearch.space.specs.teacher_source`'s rule.

Checkpoints (syne-tune's pattern): with `setup.checkpoint_every=k`, every k-th epoch's report is
`report(metrics, checkpoint=folder)`, a local folder holding everything needed to continue
exactly (kdsearch.train.checkpoint); the caller copies it during the call (Ray Tune's
`tune.report(..., checkpoint=tune.Checkpoint.from_directory(folder))` does).
`setup.resume_from=folder` starts from such a folder: the next epoch is its epoch + 1, and the
weights, the loss's projectors, the optimizer, the LR schedule and torch's RNG are as they
were, so the trial ends with the weights of an uninterrupted one (training batches are a
function of (seed, epoch)).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdsearch.space.specs import TrialSpec
from kdsearch.train.data import load_data
from kdsearch.train.faults import TrialFault, TrialOutOfMemory, TrialTimedOut
from kdsearch.train.loop import TrialDiverged
from kdsearch.train.parallel import run_data_parallel
from kdsearch.train.setup import Report, TrialSetup
from kdsearch.train.training import teacher_signal, train_trial

__all__ = [
    "Report",
    "TrialDiverged",
    "TrialFault",
    "TrialOutOfMemory",
    "TrialSetup",
    "TrialTimedOut",
    "run_trial",
    "trial_device",
]

# Whether this process has said that the GPUs it was given are not visible to torch (said once per process)
_said_no_cuda = False


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def trial_device(gpu_ids: Sequence[int | str] = (), say: Callable[[str], None] = _to_stderr) -> torch.device:
    """The device a trial trains on: CUDA when torch sees it, else the CPU.

    `gpu_ids` are the GPUs this process was given (Ray's `ray.get_gpu_ids()`, which Ray also
    puts in CUDA_VISIBLE_DEVICES): given some while torch sees no CUDA (a CPU build of torch, no
    driver, or GPUs a node only declares), the process says so in one line, once whatever
    number of trials it runs, and the trial trains on the CPU."""
    global _said_no_cuda
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpu_ids and not _said_no_cuda:
        _said_no_cuda = True
        why = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} finds no CUDA device here"
        )
        given = f"GPU{'s' if len(gpu_ids) > 1 else ''} {','.join(map(str, gpu_ids))}"
        say(
            f"kdsearch: this trial was given {given} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}) but {why}: training on the CPU"
        )
    return torch.device("cpu")


def run_trial(spec: TrialSpec, setup: TrialSetup, report: Report) -> dict[str, Any]:
    """Train `spec`'s student by distillation; report after each epoch.

    Args:
        spec: The trial: student, recipe, training settings, data and teacher.
        setup: What it is given and how it runs (kdsearch.train.setup.TrialSetup): what the
            setup does not carry (the data, the teacher, its cache) is loaded or filled here.
            `setup.world_size` > 1 trains data-parallel in that many processes
            (kdsearch.train.parallel); `setup.device` defaults to `trial_device()`.
        report: Called after each epoch with its metrics (and, every `setup.checkpoint_every`
            epochs, `checkpoint=folder`): val_acc, every computed objective (FLOPs, MACs,
            params), the measured ones among `setup.objectives`, the loss parts, timings and
            world_size (the processes training it).

    Returns:
        The last epoch's metrics, with "checkpoint": the weights' path. The student's files
        (kdsearch.train.checkpoint.STUDENT_FILES) are saved in `setup.workdir`.
    """
    setup.workdir.mkdir(parents=True, exist_ok=True)
    if setup.data is None:
        setup = dataclasses.replace(setup, data=load_data(spec.data))
    if setup.world_size > 1:
        return run_data_parallel(spec, setup, report)
    device = setup.device if setup.device is not None else trial_device()
    signal = teacher_signal(spec, setup, device)
    return train_trial(spec, setup, report, signal=signal, device=device)
