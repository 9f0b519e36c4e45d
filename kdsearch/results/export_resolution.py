"""`kdsearch export --img-size N`: the exported student carried to another resolution.

The weights are, in this order of preference:

    fine-tuned  the completed `finetuned` row of study.parquet for the trial at N with the best
                val_acc (ties: the lowest seed); its weights, the StudentViT built at N, read from
                the run's storage at the row's `weights` path
    zero-shot   the trial's own weights carried to N (kdsearch.models.resolution.carry_student:
                each positional encoding its usual way), no training at N

The exported spec is the trial's at N (student.img_size and data.img_size), so its FLOPs, the
ONNX graph and its check, and the test accuracy are all at N; the card's `carried` section and
README.md say which weights these are. Torch is imported only when weights are carried.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.study import FINETUNED, ZERO_SHOT
from kdsearch.results.tables import RunPaths
from kdsearch.space import objectives as objective_table
from kdsearch.space.specs import StudentSpec, TrialSpec

__all__ = ["carried_row", "carry_export", "finetuned_row", "row_at"]


def finetuned_row(run: RunPaths, trial_id: str, img_size: int) -> dict[str, Any] | None:
    """The study's completed fine-tuned row of `trial_id` at `img_size` with the best val_acc
    (ties: the lowest seed), or None when the study fine-tuned none there.

    Args:
        run: The run holding the study (study.parquet beside trials.parquet).
        trial_id: The trial exported.
        img_size: The resolution asked for, in pixels.

    Returns:
        The study.parquet row, or None.
    """
    rows = [
        r
        for r in run.rows(RunPaths.RESOLUTIONS)
        if r["trial_id"] == trial_id
        and int(r["img_size"]) == img_size
        and r["mode"] == FINETUNED
        and r["status"] == Status.COMPLETED
        and r.get("weights")
    ]
    return max(rows, key=lambda r: (r["val_acc"], -int(r["seed"])), default=None)


def carry_export(
    spec: TrialSpec, row: dict[str, Any], run: RunPaths, weights: bytes, img_size: int
) -> tuple[TrialSpec, bytes, dict[str, Any]]:
    """The trial's spec and weights at `img_size`: fine-tuned there by the study when it was, else carried.

    Args:
        spec: The trial's spec (at the resolution it was searched at).
        row: Its trials.parquet row.
        run: The run (its storage holds the study's fine-tuned weights).
        weights: The trial's own safetensors bytes.
        img_size: The resolution asked for, in pixels (square).

    Returns:
        `(spec at img_size, safetensors bytes of the student built at img_size, the card's
        `carried` section)`; at the trained size with nothing fine-tuned there, `(spec, weights, None)`.

    Raises:
        KdsearchError: `img_size` is not a multiple of the patch size (or the student cannot be
            built at it), or the study's fine-tuned weights are missing from the run.
    """
    from safetensors.torch import load, save

    from kdsearch.models.resolution import carry_student, spec_at

    student = spec.student
    try:
        at = spec_at(student, img_size)
    except ValueError as e:
        raise KdsearchError(f"--img-size {img_size}: {str(e).removeprefix(f'img_size {img_size}: ')}") from None
    tuned = finetuned_row(run, row["trial_id"], img_size)
    if tuned is None and img_size == student.img_size:
        return spec, weights, None
    if tuned is None:
        at, state = carry_student(student, load(weights), img_size)
        weights = save({k: v.contiguous() for k, v in state.items()})
    else:
        if not run.store.exists(tuned["weights"]):
            raise KdsearchError(
                f"{run.store.uri_of(tuned['weights'])} is missing: the study's fine-tuned weights of trial "
                f"{row['trial_id']} at {img_size} px; run `kdsearch study` again to make them"
            )
        weights = run.store.read_bytes(tuned["weights"])
    at_spec = dataclasses.replace(spec, student=at, data=dataclasses.replace(spec.data, img_size=img_size))
    return at_spec, weights, carried_section(student, img_size, tuned)


def carried_section(trained: StudentSpec, img_size: int, tuned: dict[str, Any] | None) -> dict[str, Any]:
    """The card's `carried` section: from and to which resolution, zero-shot or fine-tuned (how)."""
    base = {"from_img_size": trained.img_size, "img_size": img_size, "pos_embed": trained.pos_embed}
    moved = f"carried from {trained.img_size} px to {img_size} px"
    if img_size == trained.img_size:  # only with a fine-tuned row: zero-shot at this size is no carry at all
        moved = f"at its trained {img_size} px"
    if tuned is None:
        return {**base, "mode": ZERO_SHOT, "how": f"{moved}, zero-shot (no training at {img_size} px)"}
    epochs, seed = int(tuned["finetune_epochs"]), int(tuned["seed"])
    return {
        **base,
        "mode": FINETUNED,
        "finetune_epochs": epochs,
        "seed": seed,
        "weights": tuned["weights"],
        "study_val_acc": float(tuned["val_acc"]),
        "how": f"{moved}, fine-tuned {epochs} epoch{'s' if epochs != 1 else ''} (seed {seed})",
    }


def row_at(row: dict[str, Any], spec: TrialSpec, model: Any, carried: dict[str, Any]) -> dict[str, Any]:
    """The trial's row as the card shows the carried student: val_acc measured at the new
    resolution, the computed objectives (FLOPs, MACs, params) of the spec there, and the
    measured ones (latency, ...) None: they were measured at the trained resolution.

    Args:
        row: The trial's trials.parquet row.
        spec: The spec at the new resolution (from `carry_export`).
        model: The student at the new resolution, its weights loaded.
        carried: The card's `carried` section (from `carry_export`).

    Returns:
        The row with those values replaced (and best_val_acc None: it was at the trained resolution).

    Raises:
        KdsearchError: the val split is not on this machine and the study measured none at that resolution.
    """
    from kdsearch.train.data import load_data
    from kdsearch.train.evaluation import evaluate

    try:
        val_acc = evaluate(model, load_data(spec.data))
    except KdsearchError as e:
        val_acc = carried.get("study_val_acc")
        if val_acc is None:
            raise KdsearchError(
                f"--img-size {carried['img_size']}: the val accuracy there needs {spec.data.name}'s images here ({e})"
            ) from None
    out = {**row, "val_acc": val_acc, "best_val_acc": None}
    for name, objective in objective_table.OBJECTIVES.items():
        if name in out and objective.measure is not None:
            out[name] = None
    out.update({k: v for k, v in objective_table.computed(spec.student).items() if k in out})
    return out


def carried_row(card: dict[str, Any]) -> str:
    """README.md's "resolution" row of a carried student ("" for one exported at its own resolution)."""
    c = card.get("carried")
    if not c:
        return ""
    return (
        f"| resolution | {c['how']}; `{c['pos_embed']}` carried its usual way; val accuracy, FLOPs and the ONNX "
        f"check at {c['img_size']} px |\n"
    )
