"""The student: a small pre-norm ViT (DeiT style) built from a `StudentSpec` on timm's layers.

Every positional encoding (a row of kdsearch.space.encodings' table) is one `PosEncoding`
subclass in `POS_ENCODINGS`, made by name in `create_pos_encoding`. A `PosEncoding` can
touch the model at four points, and each type uses only the ones it needs:

    tokens     after the prefix tokens are concatenated   learned (all tokens), sincos (patches)
    rope       rotary embedding for q/k of patch tokens   rope
    attn_bias  additive bias on each block's logits       relpos
    after_block  after a block                            cpe (after the first block: CPVT's PEG)

so blocks and attention know nothing about which encoding is in use.

Token layout is `[cls, (dist), patch_0 ... patch_{N-1}]`: prefix tokens first, as in timm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import (
    Mlp,
    PatchEmbed,
    RelPosBias,
    RotaryEmbeddingCat,
    apply_rot_embed_cat,
    build_sincos2d_pos_embed,
    trunc_normal_,
)
from torch import Tensor, nn

from kdsearch.space.specs import StudentSpec

__all__ = [
    "Attention",
    "Block",
    "POS_ENCODINGS",
    "PosEncoding",
    "StudentOutput",
    "StudentViT",
    "build_student",
    "create_pos_encoding",
    "init_vit_weights",
]

LN_EPS = 1e-6


# --------------------------------------------------------------------------- positional encodings


class PosEncoding(nn.Module):
    """No positional information (`none`); the base every other encoding overrides."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        self.num_prefix_tokens = spec.num_prefix_tokens

    def tokens(self, x: Tensor) -> Tensor:
        """Applied once to `(B, T, D)` right after the prefix tokens are concatenated."""
        return x

    def rope(self) -> Tensor | None:
        """Concatenated sin/cos `(N, 2 * head_dim)` for the patch tokens' q and k, or None."""
        return None

    def attn_bias(self, block: int) -> Tensor | None:
        """Additive attention-logit bias `(1, H, T, T)` for block `block`, or None."""
        return None

    def after_block(self, block: int, x: Tensor) -> Tensor:
        """Applied to `(B, T, D)` after block `block`."""
        return x


class LearnedPos(PosEncoding):
    """ViT / DeiT: a learned embedding added to every token, prefix tokens included."""

    def __init__(self, spec: StudentSpec):
        super().__init__(spec)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches + spec.num_prefix_tokens, spec.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def tokens(self, x: Tensor) -> Tensor:
        return x + self.pos_embed


class SinCosPos(PosEncoding):
    """MAE / MoCo v3: a fixed 2-D sine-cosine embedding added to the patch tokens only."""

    def __init__(self, spec: StudentSpec):
        super().__init__(spec)
        g = spec.grid_size
        # Derived from the spec, so not saved in the state dict (and never trained).
        self.register_buffer(
            "pos_embed", build_sincos2d_pos_embed([g, g], spec.embed_dim).unsqueeze(0), persistent=False
        )

    def tokens(self, x: Tensor) -> Tensor:
        npt = self.num_prefix_tokens
        return torch.cat([x[:, :npt], x[:, npt:] + self.pos_embed.to(x.dtype)], dim=1)


class RelPos(PosEncoding):
    """Swin / BEiT: a learned relative-position bias per head, one table per block.

    timm's `RelPosBias` is built with `prefix_tokens=0` (it supports at most one prefix
    token, and a distilled student has two); its patch-only bias is zero-padded so the
    prefix tokens' rows and columns get no bias.
    """

    def __init__(self, spec: StudentSpec):
        super().__init__(spec)
        g = spec.grid_size
        self.rel_pos = nn.ModuleList(RelPosBias((g, g), spec.num_heads, prefix_tokens=0) for _ in range(spec.depth))

    def attn_bias(self, block: int) -> Tensor | None:
        npt = self.num_prefix_tokens
        return F.pad(self.rel_pos[block].get_bias(), (npt, 0, npt, 0))


class RopePos(PosEncoding):
    """EVA-02 / RoPE-ViT: 2-D axial rotary embedding on the q and k of patch tokens.

    One `RotaryEmbeddingCat` (no parameters; a cached non-persistent buffer) shared by all blocks.
    """

    def __init__(self, spec: StudentSpec):
        super().__init__(spec)
        g = spec.grid_size
        self.rope_embed = RotaryEmbeddingCat(dim=spec.head_dim, in_pixels=False, feat_shape=[g, g])

    def rope(self) -> Tensor | None:
        return self.rope_embed.get_embed()


class ConvPos(PosEncoding):
    """CPVT's PEG: a residual 3x3 depthwise conv over the patch grid after the first block."""

    def __init__(self, spec: StudentSpec):
        super().__init__(spec)
        d = spec.embed_dim
        self.grid_size = spec.grid_size
        self.proj = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d, bias=True)

    def after_block(self, block: int, x: Tensor) -> Tensor:
        if block != 0:
            return x
        npt, g = self.num_prefix_tokens, self.grid_size
        prefix, patch = x[:, :npt], x[:, npt:]
        b, n, d = patch.shape
        feat = patch.transpose(1, 2).reshape(b, d, g, g)
        patch = self.proj(feat).flatten(2).transpose(1, 2) + patch
        return torch.cat([prefix, patch], dim=1)


POS_ENCODINGS: dict[str, type[PosEncoding]] = {
    "learned": LearnedPos,
    "sincos": SinCosPos,
    "relpos": RelPos,
    "rope": RopePos,
    "cpe": ConvPos,
    "none": PosEncoding,
}
"""The layers of each positional encoding, by name: the same names as kdsearch.space.encodings' table."""


def create_pos_encoding(name: str, spec: StudentSpec) -> PosEncoding:
    """The positional encoding called `name`, built for `spec`.

    Args:
        name: a key of `POS_ENCODINGS` (a `pos_embed` value).
        spec: the student it is built for (its widths, grid, depth and prefix tokens).

    Returns:
        The encoding's module, whose hooks `StudentViT` calls.

    Raises:
        ValueError: `name` is not in `POS_ENCODINGS` (the message lists the names that are).
    """
    try:
        cls = POS_ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown pos_embed {name!r}; expected one of {', '.join(POS_ENCODINGS)}") from None
    return cls(spec)


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head self-attention that takes rope and an additive bias and can return its map.

    `fused_attn` (True by default) uses `F.scaled_dot_product_attention`; the explicit path
    (`q * scale @ k^T + bias`, softmax, `@ v`) runs when it is False or the map is asked for.
    """

    fused_attn: bool

    def __init__(self, dim: int, num_heads: int, num_prefix_tokens: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        bias: Tensor | None = None,
        return_attn: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`(B, T, D)` -> `((B, T, D), attention probabilities (B, H, T, T) or None)`."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope)], dim=2).type_as(v)
        if bias is not None:
            bias = bias.to(q.dtype)  # SDPA wants a float mask in q's dtype (matters under autocast)

        attn: Tensor | None = None
        if self.fused_attn and not return_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, t, d)
        return self.proj(x), attn


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, num_prefix_tokens: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, num_prefix_tokens)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden_features=mlp_hidden, act_layer=nn.GELU)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        bias: Tensor | None = None,
        return_attn: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        y, attn = self.attn(self.norm1(x), rope=rope, bias=bias, return_attn=return_attn)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


# --------------------------------------------------------------------------- model


class StudentOutput(NamedTuple):
    """What `StudentViT.forward_distill` returns.

    logits: class-head logits `(B, K)`. dist_logits: distillation-head logits, None
    without a distillation token. tokens: `(B, T, D)` after the final norm.
    block_features: each block's output `(B, T, D)` (the residual stream the next block
    reads, so after CPVT's PEG for block 0), or None. attn: the last block's attention
    probabilities `(B, H, T, T)`, or None. num_prefix_tokens: how many of the T tokens come
    before the patches (class token, distillation token).
    """

    logits: Tensor
    dist_logits: Tensor | None
    tokens: Tensor
    block_features: list[Tensor] | None
    attn: Tensor | None
    num_prefix_tokens: int = 1


class StudentViT(nn.Module):
    """A DeiT-style ViT student; see the module docstring for the token layout."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.patch_embed = PatchEmbed(
            img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, embed_dim=d
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.distill_token else None
        self.pos_enc = create_pos_encoding(spec.pos_embed, spec)
        self.blocks = nn.ModuleList(
            Block(d, spec.num_heads, spec.mlp_hidden, spec.num_prefix_tokens) for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, spec.num_classes)
        self.head_dist = nn.Linear(d, spec.num_classes) if spec.distill_token else None
        self._init_weights()

    def _init_weights(self) -> None:
        """timm ViT init: trunc-normal(.02) Linear weights and tokens, zero biases.

        LayerNorm (ones/zeros), convolutions (PyTorch default, as timm's ViT leaves its
        patch embedding) and RelPosBias (its own trunc-normal) keep their own inits.
        """
        init_vit_weights(self, (self.cls_token, self.dist_token))

    def _tokens(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        return self.pos_enc.tokens(torch.cat(prefix + [x], dim=1))

    def _run_blocks(
        self, x: Tensor, attn: bool, block_features: bool
    ) -> tuple[Tensor, list[Tensor] | None, Tensor | None]:
        x = self._tokens(x)
        rope = self.pos_enc.rope()
        feats: list[Tensor] | None = [] if block_features else None
        last_attn: Tensor | None = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, a = block(x, rope=rope, bias=self.pos_enc.attn_bias(i), return_attn=attn and i == last)
            x = self.pos_enc.after_block(i, x)
            if feats is not None:
                feats.append(x)
            if a is not None:
                last_attn = a
        return self.norm(x), feats, last_attn

    def forward_features(self, x: Tensor) -> Tensor:
        """Images `(B, C, H, W)` -> tokens `(B, T, D)` after the final norm."""
        return self._run_blocks(x, attn=False, block_features=False)[0]

    def forward_head(self, tokens: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits from tokens. With a distillation token: `(cls, dist)` in training, their mean in eval (DeiT)."""
        logits = self.head(tokens[:, 0])
        if self.head_dist is None:
            return logits
        dist = self.head_dist(tokens[:, 1])
        if self.training:
            return logits, dist
        return (logits + dist) / 2

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))

    def forward_distill(self, x: Tensor, attn: bool = False, block_features: bool = False) -> StudentOutput:
        """Everything distillation losses need in one pass; only the last block goes explicit for `attn`."""
        tokens, feats, last_attn = self._run_blocks(x, attn=attn, block_features=block_features)
        logits = self.head(tokens[:, 0])
        dist = self.head_dist(tokens[:, 1]) if self.head_dist is not None else None
        return StudentOutput(logits, dist, tokens, feats, last_attn, self.num_prefix_tokens)


def init_vit_weights(model: nn.Module, tokens: tuple[nn.Parameter | None, ...]) -> None:
    """timm ViT init, in this order: trunc-normal(.02) `tokens` (None skipped), then every
    Linear's weight trunc-normal(.02) and its bias zero; other layers keep their own inits."""
    for token in tokens:
        if token is not None:
            trunc_normal_(token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_student(spec: StudentSpec) -> StudentViT:
    """The student `spec` describes; ValueError (listing every reason) if it cannot be built."""
    problems = spec.problems()
    if problems:
        raise ValueError("cannot build student: " + "; ".join(problems))
    return StudentViT(spec)
