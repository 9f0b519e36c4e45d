"""Exact FLOPs, MACs and parameter count of a student, from its spec alone (no model built).

Convention: FLOPs for ONE image at inference, 2 FLOPs per multiply-add, counting exactly
what `torch.utils.flop_counter.FlopCounterMode` counts on `kdsearch.models.student`'s model with
its attention on the explicit path: convolutions, linear layers, and the two attention
matmuls (q @ k^T and attn @ v). Elementwise work (adds, bias adds, softmax, LayerNorm,
GELU, the rope rotation, positional-embedding adds) counts 0, as in FlopCounterMode and
fvcore. MACs = FLOPs / 2.

(FlopCounterMode counts `F.scaled_dot_product_attention` on CPU as 0, so measuring the
fused model under-counts by the attention matmuls; this formula always includes them.)

With D = embed_dim, M = mlp_hidden, N patches, P = prefix tokens (cls + optional
distillation token), T = N + P, K = classes, C = in_chans, p = patch size, and each block
counted depth times:

    FLOPs   patch embed         2 N D C p^2
            per block           8 T D^2 (qkv 6, proj 2) + 4 T^2 D (attention) + 4 T D M (mlp)
            heads               2 D K each (two with a distillation token)
            encoding            its row's `flops` in kdsearch.space.encodings

    params  patch embed         D C p^2 + D
            tokens              P D
            per block           4 D (two LayerNorms) + 3 D^2 + 3 D + D^2 + D + D M + M + M D + D
            final norm          2 D
            heads               D K + K each
            encoding            its row's `params` in kdsearch.space.encodings

The model is the truth: tests/test_flops.py checks both counts against it, for every encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsearch.space.encodings import ENCODINGS
from kdsearch.space.specs import StudentSpec

__all__ = ["FlopCount", "count_flops"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs and MACs for one image at inference, and the trainable parameter count."""

    flops: int
    macs: int
    params: int


def count_flops(spec: StudentSpec) -> FlopCount:
    """The exact `FlopCount` of `build_student(spec)`.

    Raises:
        ValueError: the spec cannot be built (`StudentSpec.problems`, every reason listed).
    """
    problems = spec.problems()
    if problems:
        raise ValueError("cannot count a student that cannot be built: " + "; ".join(problems))

    d, depth, m = spec.embed_dim, spec.depth, spec.mlp_hidden
    n, p = spec.num_patches, spec.num_prefix_tokens
    t = n + p
    k, c, ps = spec.num_classes, spec.in_chans, spec.patch_size
    num_heads_out = 1 + int(spec.distill_token)
    encoding = ENCODINGS[spec.pos_embed]

    macs = n * d * c * ps * ps  # patch embedding conv
    macs += depth * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)
    macs += num_heads_out * d * k
    flops = 2 * macs + encoding.flops(spec)  # every counted FLOP is half of a multiply-add: flops is even

    params = d * c * ps * ps + d  # patch embedding conv + bias
    params += p * d  # cls (+ dist) token
    params += depth * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d))
    params += 2 * d  # final norm
    params += num_heads_out * (d * k + k)
    params += encoding.params(spec)

    return FlopCount(flops=flops, macs=flops // 2, params=params)
