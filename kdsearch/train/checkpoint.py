"""A trained student's files and a checkpoint folder's training state.

A student is `STUDENT_FILES` in one folder: its spec (everything needed to rebuild it) and
its weights, written, uploaded and copied in that order, so the weights' presence means the
student is complete. A checkpoint folder is a student plus `TRAINING_STATE`, everything
needed to continue training exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.space.specs import TrialSpec

SPEC_FILE = "trial_spec.json"
WEIGHTS_FILE = "model.safetensors"
STUDENT_FILES = (SPEC_FILE, WEIGHTS_FILE)  # in writing order: the weights last, their presence means complete
TRAINING_STATE = "training_state.pt"


def save_student(model: nn.Module, spec: TrialSpec, folder: Path) -> Path:
    """Write `STUDENT_FILES` to `folder`, each written then renamed, the spec first.

    Returns:
        The weights' path.
    """
    from safetensors.torch import save_file

    write_text_atomic(folder / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
    path = folder / WEIGHTS_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    return path


def save_training_state(
    folder: Path,
    epoch: int,
    spec: TrialSpec,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """A checkpoint folder: the student's files as `save_student` writes them (so a checkpoint
    is also a usable student) and `TRAINING_STATE` (the epoch, the loss module's weights, the
    optimizer's and the schedule's state, torch's RNG), tensors only: it loads with
    `torch.load(weights_only=True)`. Rewrites `folder` in place, each file written then renamed.

    Returns:
        `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "loss_fn": {k: v.detach().cpu() for k, v in loss_fn.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(folder / TRAINING_STATE) as tmp:
        torch.save(state, tmp)
    save_student(model, spec, folder)
    return folder


def load_training_state(
    folder: Path, spec: TrialSpec, model: nn.Module, loss_fn: nn.Module, device: torch.device
) -> dict[str, Any]:
    """Load a checkpoint folder's weights into `model` and `loss_fn`.

    Returns:
        The rest of its state (epoch, optimizer, schedule, RNG) for the loop.

    Raises:
        ValueError: the checkpoint is of another spec than `spec`.
    """
    from safetensors.torch import load_file

    saved = json.loads((folder / SPEC_FILE).read_text())
    if saved != json.loads(json.dumps(spec.to_dict())):
        raise ValueError(f"{folder}: the checkpoint is of another trial spec")
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))
    state = torch.load(folder / TRAINING_STATE, map_location=device, weights_only=True)
    loss_fn.load_state_dict(state["loss_fn"])
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set torch's RNG (and CUDA's, on the same number of devices) as `state` saved it."""
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
