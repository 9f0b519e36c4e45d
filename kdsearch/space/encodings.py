"""Positional encodings: one torch-free table that the specs, the FLOPs and the model read.

Each `Encoding` row holds what one `pos_embed` value means: its name, a line saying what it
is, the trainable parameters and the FLOPs it adds to a student, and the width it needs.
`kdsearch.space.specs` takes `POS_EMBEDS` and the width rule from here, `kdsearch.space.flops`
each encoding's parameter and FLOPs terms, and `kdsearch.models.student` builds one
`PosEncoding` class per row (its `POS_ENCODINGS` registry has exactly these keys).

The counts follow `kdsearch.space.flops`: FLOPs of one image at inference, 2 per
multiply-add, elementwise work (adds, the rope rotation) 0; parameters are the trainable
ones (sincos' and rope's fixed tables are buffers). In the formulas D = embed_dim,
L = depth, H = num_heads, g = grid side, N = g*g patches, P = prefix tokens.

Adding an encoding is one row here and one `PosEncoding` subclass with its `POS_ENCODINGS`
entry in kdsearch/models/student.py; tests/test_flops.py holds every row's counts to the
model it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ENCODINGS", "Encoding", "StudentDims", "WidthRule", "get_encoding"]


class StudentDims(Protocol):
    """The sizes of a student that an encoding's formulas read (`StudentSpec` has them all)."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def depth(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def grid_size(self) -> int: ...

    @property
    def num_patches(self) -> int: ...

    @property
    def num_prefix_tokens(self) -> int: ...


@dataclass(frozen=True)
class WidthRule:
    """An encoding builds only when the width `dim` ("embed_dim" or "head_dim") is a multiple of `multiple`."""

    dim: str
    multiple: int


def _zero(dims: StudentDims) -> int:
    return 0


@dataclass(frozen=True)
class Encoding:
    """One row of the positional-encodings table.

    Args:
        name: the `pos_embed` value a space names.
        description: what the encoding is, in one line (with the models that use it).
        params: the trainable parameters it adds to a student, from the student's sizes.
        flops: the FLOPs it adds to one image's inference, from the student's sizes.
        width_rule: the width it needs, or None when any width builds.
    """

    name: str
    description: str
    params: Callable[[StudentDims], int] = _zero
    flops: Callable[[StudentDims], int] = _zero
    width_rule: WidthRule | None = None

    def width_problem(self, embed_dim: int, num_heads: int) -> str | None:
        """Why this encoding cannot run at this width (the detail of a `pos_embed` problem), or None.

        A rule on head_dim applies once embed_dim divides by num_heads (that division's
        failure is a problem of its own). The rule reads the width and heads alone, so the
        space file checks it over (width, heads, encoding) combinations.
        """
        rule = self.width_rule
        if rule is None:
            return None
        if rule.dim == "head_dim":
            if embed_dim % num_heads:
                return None
            value = embed_dim // num_heads
        else:
            value = embed_dim
        if value % rule.multiple == 0:
            return None
        return f"{self.name} needs {rule.dim} divisible by {rule.multiple}, got {rule.dim} {value}"


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding(
            "learned",
            "learnable absolute embedding added to all tokens (ViT, DeiT)",
            params=lambda s: (s.num_patches + s.num_prefix_tokens) * s.embed_dim,  # (N + P) D
        ),
        Encoding(
            "sincos",
            "fixed 2-D sine-cosine embedding on patch tokens (MAE, MoCo v3)",
            width_rule=WidthRule("embed_dim", 4),
        ),
        Encoding(
            "relpos",
            "learned relative position bias per head inside attention (Swin, BEiT)",
            params=lambda s: s.depth * (2 * s.grid_size - 1) ** 2 * s.num_heads,  # L (2g - 1)^2 H
        ),
        Encoding(
            "rope",
            "2-D rotary embedding on queries and keys of patch tokens (EVA-02, RoPE-ViT)",
            width_rule=WidthRule("head_dim", 4),
        ),
        Encoding(
            "cpe",
            "depthwise 3x3 conv over the token grid after the first block (CPVT's PEG)",
            params=lambda s: 9 * s.embed_dim + s.embed_dim,  # 3x3 depthwise weights + bias: 9 D + D
            flops=lambda s: 2 * s.num_patches * s.embed_dim * 9,  # once, on the patch grid: 2 N D 9
        ),
        Encoding("none", "no positional information"),
    )
}
"""Every positional encoding a student can use, by name, in the order spaces and reports list them."""


def get_encoding(name: str) -> Encoding:
    """The table's row called `name`.

    Raises:
        ValueError: `name` is not in the table (the message lists the names that are).
    """
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown pos_embed {name!r}; expected one of {', '.join(ENCODINGS)}") from None
