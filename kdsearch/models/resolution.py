"""A trained student carried to another input resolution, its patch size kept.

The token grid changes with the image size (`img_size // patch_size` patches per side), so
each positional encoding is carried its usual way (one function per encoding in `CARRIERS`,
whose keys are `POS_ENCODINGS`' names):

    learned   the absolute table resampled by timm's `resample_abs_pos_embed` (bicubic,
              antialiased; the prefix tokens' rows kept as they are), as timm and DeiT do
    relpos    each block's `relative_position_bias_table` resized by timm's
              `resize_rel_pos_bias_table` (BEiT's geometric-progression interpolation)
    sincos    recomputed for the new grid (a non-persistent buffer: nothing in the state)
    rope      recomputed for the new grid (a non-persistent buffer: nothing in the state)
    cpe       as it is (a 3x3 depthwise conv runs on any grid)
    none      as it is

Every other weight (patch embedding, tokens, blocks, heads) does not depend on the grid.
At the spec's own image size the state is returned as it is, so the logits are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import Tensor

from kdsearch.models.student import StudentViT, build_student
from kdsearch.space.specs import StudentSpec

__all__ = ["CARRIERS", "carried_student", "carry_student", "spec_at"]

State = dict[str, Tensor]
Carrier = Callable[[StudentSpec, StudentSpec, State], State]

LEARNED_KEY = "pos_enc.pos_embed"
RELPOS_TABLE = "relative_position_bias_table"  # one per block, under pos_enc.rel_pos.{block}.


def spec_at(spec: StudentSpec, img_size: int) -> StudentSpec:
    """`spec` at `img_size` pixels (square), its patch size and every width kept.

    Args:
        spec: the student as trained.
        img_size: the new input size in pixels.

    Returns:
        The spec with `img_size` replaced.

    Raises:
        ValueError: `img_size` is not a positive multiple of the patch size, or the spec
            cannot be built at it (one line).
    """
    p = spec.patch_size
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < p or img_size % p:
        raise ValueError(
            f"img_size {img_size!r}: must be a multiple of the student's patch size {p} "
            f"(at least {p}; e.g. {', '.join(str(p * k) for k in (2, 3, 4, 6))})"
        )
    new = dataclasses.replace(spec, img_size=img_size)
    problems = new.problems()
    if problems:
        raise ValueError(f"img_size {img_size}: the student cannot be built at it: " + "; ".join(map(str, problems)))
    return new


def carry_student(spec: StudentSpec, state: State, img_size: int) -> tuple[StudentSpec, State]:
    """The student's spec and state dict carried to `img_size` (see the module docstring).

    Args:
        spec: the student the state belongs to.
        state: its state dict (as `StudentViT.state_dict()` or a safetensors file holds it).
        img_size: the new input size in pixels: a multiple of the patch size.

    Returns:
        `(spec at img_size, state for it)`; at `spec.img_size`, `(spec, state)` unchanged.

    Raises:
        ValueError: `img_size` is not a multiple of the patch size, or the spec cannot be built at it.
    """
    new = spec_at(spec, img_size)
    if img_size == spec.img_size:
        return spec, state
    return new, CARRIERS[spec.pos_embed](spec, new, state)


def carried_student(spec: StudentSpec, state: State, img_size: int) -> StudentViT:
    """The student built at `img_size` with its carried state loaded strictly, in eval mode.

    Args:
        spec: the student the state belongs to.
        state: its state dict.
        img_size: the new input size in pixels.

    Returns:
        The `StudentViT` of `spec_at(spec, img_size)`, in eval mode.

    Raises:
        ValueError: as `carry_student`.
    """
    new, carried = carry_student(spec, state, img_size)
    model = build_student(new)
    model.load_state_dict(carried, strict=True)
    return model.eval()


def _as_is(old: StudentSpec, new: StudentSpec, state: State) -> State:
    """sincos, rope (their tables are recomputed buffers), cpe and none: no weight depends on the grid."""
    return dict(state)


def _learned(old: StudentSpec, new: StudentSpec, state: State) -> State:
    """The learned table `(1, prefix + g*g, D)` resampled to the new grid; prefix rows kept."""
    table = resample_abs_pos_embed(
        state[LEARNED_KEY],
        new_size=[new.grid_size, new.grid_size],
        old_size=[old.grid_size, old.grid_size],
        num_prefix_tokens=old.num_prefix_tokens,
    )
    return {**state, LEARNED_KEY: table.contiguous()}


def _relpos(old: StudentSpec, new: StudentSpec, state: State) -> State:
    """Each block's `((2g-1)^2, heads)` bias table resized to the new grid's window."""
    g = new.grid_size
    shape = ((2 * g - 1) ** 2, new.num_heads)
    out = dict(state)
    for key, table in state.items():
        if key.startswith("pos_enc.rel_pos.") and key.endswith(RELPOS_TABLE):
            out[key] = resize_rel_pos_bias_table(
                table, new_window_size=(g, g), new_bias_shape=shape, old_window_size=(old.grid_size, old.grid_size)
            ).contiguous()
    return out


CARRIERS: dict[str, Carrier] = {
    "learned": _learned,
    "sincos": _as_is,
    "relpos": _relpos,
    "rope": _as_is,
    "cpe": _as_is,
    "none": _as_is,
}
"""How each positional encoding's weights follow a new token grid, by `pos_embed` name
(the keys of `kdsearch.models.student.POS_ENCODINGS`; a test holds them equal)."""
