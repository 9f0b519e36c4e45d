"""One weight-sharing student that holds every student of a space (one-shot screening).

A subnet is leading slices of the supernet's weights (AutoFormer's weight entanglement):
width `[:d]` of every Linear, LayerNorm, token and convolution; the attention's qkv is laid
out `[q; k; v]` as `kdsearch.models.student.Attention` has it, so a subnet's q, k and v are
each `[:d, :d]` of theirs, split into the subnet's heads; the MLP's hidden width `[:m]`; the
blocks `[:depth]`. The patch embedding serves every patch size as FlexiViT does: one kernel
at the largest patch size, PI-resized (timm's `PatchEmbedResamplerFixedOrigSize`, whose
pseudo-inverse is cached per size) to the subnet's. Every positional encoding keeps its own
parameters, built by `kdsearch.models.student` at the largest student it serves:

    learned   one table at the largest grid with every prefix row (cls, then dist); a subnet
              takes cls (and dist for a distilled student), and the patch rows resampled to its
              grid as timm's `resample_abs_pos_embed` does, width [:d]
    relpos    one table per block at the largest grid G in timm's `RelPosBias` layout
              ((2G-1) x (2G-1) offsets); a grid g takes the central (2g-1) x (2g-1) offsets, heads [:h]
    cpe       the depthwise 3x3 convolution, channels [:d]
    sincos, rope, none   no parameters: the subnet's own buffers, made per (encoding, grid, width)

A subnet runs `StudentViT`'s forward over those slices (`SubnetRun`, no module built per
subnet, as AutoFormer's super layers do); `subnet_state_dict` loads into `StudentViT(student)`,
whose outputs equal the subnet's (tests/test_supernet.py holds every encoding to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, resample_abs_pos_embed
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from torch import Tensor, nn

from kdsearch.models.sandwich import extreme_student, random_student, sandwich
from kdsearch.models.student import (
    LN_EPS,
    Block,
    StudentOutput,
    StudentViT,
    create_pos_encoding,
    init_vit_weights,
)
from kdsearch.space.datasets import DATASETS
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import StudentSpec

__all__ = ["PARAMETER_FREE", "Supernet", "SupernetSpec", "extreme_student", "random_student", "sandwich"]

PARAMETER_FREE = ("sincos", "rope", "none")
"""Encodings with no trainable parameters: a subnet gets its own buffers, the supernet holds nothing."""


@dataclass(frozen=True)
class SupernetSpec:
    """The union of every student a space holds: the widest, deepest, every patch size and encoding.

    `embed_dim`, `depth`, `num_heads` and `mlp_hidden` are the largest any student has
    (`mlp_hidden` = the largest `int(embed_dim * mlp_ratio)`); `distill_token`: any student has one.
    """

    img_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_sizes: tuple[int, ...]
    pos_embeds: tuple[str, ...]
    distill_token: bool

    @property
    def base_patch(self) -> int:
        """The patch size the underlying patch kernel has (the largest)."""
        return max(self.patch_sizes)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(self.distill_token)

    def storage_spec(self, pos_embed: str) -> StudentSpec:
        """The student whose encoding `pos_embed` holds every student's: the largest grid,
        width, depth, heads and every prefix token (it need not build as a student)."""
        return StudentSpec(
            img_size=self.img_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            patch_size=min(self.patch_sizes),
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            pos_embed=pos_embed,
            distill_token=self.distill_token,
        )

    @classmethod
    def of_space(cls, space: SearchSpace) -> SupernetSpec:
        """The supernet that holds every student of `space`.

        Args:
            space: a validated space (a `head_dim` dimension makes embed_dim = head_dim x num_heads).

        Returns:
            Its spec: the largest of each size over the space's student dimensions.
        """

        def values(name: str) -> list[Any]:
            dim = space.dims.get(f"student.{name}")
            return list(dim.values()) if dim is not None else [getattr(StudentSpec(), name)]

        heads = max(values("num_heads"))
        if "student.head_dim" in space.dims:
            width = max(space.dims["student.head_dim"].values()) * heads
        else:
            width = max(values("embed_dim"))
        return cls(
            img_size=space.data.img_size,
            in_chans=DATASETS[space.data.name].in_chans,
            num_classes=space.data.num_classes or 0,
            embed_dim=width,
            depth=max(values("depth")),
            num_heads=heads,
            mlp_hidden=int(width * max(values("mlp_ratio"))),
            patch_sizes=tuple(sorted(set(values("patch_size")))),
            pos_embeds=tuple(dict.fromkeys(values("pos_embed"))),
            distill_token=any(values("distill_token")),
        )


class Supernet(nn.Module):
    """The weight-sharing student of a `SupernetSpec`; see the module docstring for the slicing."""

    def __init__(self, spec: SupernetSpec):
        super().__init__()
        self.spec = spec
        d, c, p = spec.embed_dim, spec.in_chans, spec.base_patch
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(c, d, kernel_size=p, stride=p)})
        self.resampler = PatchEmbedResamplerFixedOrigSize((p, p))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.distill_token else None
        self.pos_encs = nn.ModuleDict(
            {
                name: create_pos_encoding(name, spec.storage_spec(name))
                for name in spec.pos_embeds
                if name not in PARAMETER_FREE
            }
        )
        self.blocks = nn.ModuleList(
            Block(d, spec.num_heads, spec.mlp_hidden, spec.num_prefix_tokens) for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, spec.num_classes)
        self.head_dist = nn.Linear(d, spec.num_classes) if spec.distill_token else None
        self.init_weights()
        self._pos_buffers: dict[tuple, dict[str, Tensor]] = {}  # derived, never saved: by (encoding key, device)

    def init_weights(self) -> None:
        """As `StudentViT` initializes: trunc-normal(.02) tokens and Linear weights, zero biases;
        the patch convolution and the encodings keep their own inits."""
        init_vit_weights(self, (self.cls_token, self.dist_token))

    # ---- a subnet's tensors -------------------------------------------------------------

    def check(self, student: StudentSpec) -> None:
        """ValueError when `student` is not a subnet of this supernet (or cannot be built)."""
        s, x = self.spec, student
        problems = [str(p) for p in x.problems()]
        if (x.img_size, x.in_chans, x.num_classes) != (s.img_size, s.in_chans, s.num_classes):
            problems.append("its data (image size, channels, classes) is not the supernet's")
        if x.embed_dim > s.embed_dim or x.depth > s.depth or x.num_heads > s.num_heads or x.mlp_hidden > s.mlp_hidden:
            problems.append("it is wider, deeper, has more heads or a wider MLP than the supernet")
        if x.patch_size not in s.patch_sizes or x.pos_embed not in s.pos_embeds or x.distill_token > s.distill_token:
            problems.append("its patch size, positional encoding or distillation token is not the supernet's")
        if problems:
            raise ValueError(f"not a subnet of this supernet: {student}: " + "; ".join(problems))

    def subnet_tensors(self, student: StudentSpec) -> dict[str, Tensor]:
        """Every parameter of `StudentViT(student)`, by its name there: slices of this
        supernet's parameters, so gradients flow back to them."""
        self.check(student)
        d, m, big = student.embed_dim, student.mlp_hidden, self.spec.embed_dim
        p = student.patch_size
        out = {
            "cls_token": self.cls_token[..., :d],
            "patch_embed.proj.weight": self.resampler(self.patch_embed["proj"].weight[:d], [p, p]),
            "patch_embed.proj.bias": self.patch_embed["proj"].bias[:d],
        }
        if student.distill_token:
            assert self.dist_token is not None
            out["dist_token"] = self.dist_token[..., :d]
        out.update(self.encoding_tensors(student))
        for i, block in enumerate(self.blocks[: student.depth]):
            for name, param in block.named_parameters():
                rows, cols = {"mlp.fc1": (m, d), "mlp.fc2": (d, m)}.get(name.rpartition(".")[0], (d, d))
                out[f"blocks.{i}.{name}"] = param[:rows] if param.ndim == 1 else param[:rows, :cols]
            qkv_w, qkv_b = block.attn.qkv.weight, block.attn.qkv.bias  # [q; k; v]: each its own [:d]
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv_w[j * big : j * big + d, :d] for j in range(3)])
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qkv_b[j * big : j * big + d] for j in range(3)])
        heads = [("norm", self.norm), ("head", self.head)]
        if student.distill_token:
            heads.append(("head_dist", self.head_dist))
        for name, module in heads:
            out[f"{name}.weight"] = module.weight[..., :d]
            out[f"{name}.bias"] = module.bias if name != "norm" else module.bias[:d]
        return out

    def encoding_tensors(self, student: StudentSpec) -> dict[str, Tensor]:
        """The parameters of `student`'s encoding, by their names in `StudentViT(student)`."""
        if student.pos_embed in PARAMETER_FREE:
            return {}
        enc = self.pos_encs[student.pos_embed]
        d, g, big = student.embed_dim, student.grid_size, self.spec.img_size // min(self.spec.patch_sizes)
        if student.pos_embed == "learned":
            full, npt, big_npt = enc.get_parameter("pos_embed"), student.num_prefix_tokens, self.spec.num_prefix_tokens
            patches = resample_abs_pos_embed(full[:, big_npt:, :d], [g, g], [big, big], num_prefix_tokens=0)
            return {"pos_enc.pos_embed": torch.cat([full[:, :npt, :d], patches], dim=1)}
        if student.pos_embed == "relpos":
            out = {}
            for i in range(student.depth):
                table = enc.get_parameter(f"rel_pos.{i}.relative_position_bias_table").view(
                    2 * big - 1, 2 * big - 1, -1
                )
                window = table[big - g : big + g - 1, big - g : big + g - 1, : student.num_heads]
                out[f"pos_enc.rel_pos.{i}.relative_position_bias_table"] = window.reshape(-1, student.num_heads)
            return out
        # cpe, and any encoding whose parameters are per channel: channels [:d]
        return {f"pos_enc.{name}": p[:d] for name, p in enc.named_parameters()}

    def encoding_buffers(self, student: StudentSpec) -> dict[str, Tensor]:
        """The buffers of `student`'s encoding (sincos' table, rope's, relpos' index) by their
        names in `StudentViT(student)`, made once per (encoding, grid, widths, depth, prefix,
        device) by `kdsearch.models.student` itself."""
        device = self.cls_token.device
        s = student
        key = (s.pos_embed, s.grid_size, s.embed_dim, s.num_heads, s.depth, s.num_prefix_tokens, str(device))
        if key not in self._pos_buffers:
            # NOTE: made outside inference mode, so a scoring pass never leaves inference
            # tensors that a training step would save for backward
            with torch.inference_mode(False), torch.no_grad():
                enc = create_pos_encoding(s.pos_embed, s)
                self._pos_buffers[key] = {f"pos_enc.{n}": b.to(device) for n, b in enc.named_buffers()}
        return self._pos_buffers[key]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._pos_buffers = {}  # a move or cast leaves the cached buffers where they were
        return super()._apply(fn, recurse)

    # ---- running a subnet ---------------------------------------------------------------

    def forward_distill(
        self, x: Tensor, student: StudentSpec, attn: bool = False, block_features: bool = False
    ) -> StudentOutput:
        """What `StudentViT(student).forward_distill` returns, with the inherited weights."""
        t = self.subnet_tensors(student)
        run = SubnetRun(student, t, self.encoding_buffers(student))
        tokens, feats, last_attn = run.blocks(run.tokens(x), attn, block_features)
        tokens = F.layer_norm(tokens, (student.embed_dim,), t["norm.weight"], t["norm.bias"], LN_EPS)
        logits = F.linear(tokens[:, 0], t["head.weight"], t["head.bias"])
        dist = F.linear(tokens[:, 1], t["head_dist.weight"], t["head_dist.bias"]) if student.distill_token else None
        return StudentOutput(logits, dist, tokens, feats, last_attn, student.num_prefix_tokens)

    def forward(self, x: Tensor, student: StudentSpec) -> Tensor | tuple[Tensor, Tensor]:
        """`StudentViT(student)(x)` with the inherited weights: in eval mode with a
        distillation token the mean of both heads (DeiT), in training mode the pair."""
        out = self.forward_distill(x, student)
        if out.dist_logits is None:
            return out.logits
        if self.training:
            return out.logits, out.dist_logits
        return (out.logits + out.dist_logits) / 2

    # ---- taking a subnet out ------------------------------------------------------------

    def subnet_state_dict(self, student: StudentSpec) -> dict[str, Tensor]:
        """The state dict that `StudentViT(student).load_state_dict(sd, strict=True)` takes:
        detached copies of the subnet's slices."""
        with torch.no_grad():
            return {k: v.detach().clone().contiguous() for k, v in self.subnet_tensors(student).items()}

    def extract(self, student: StudentSpec) -> StudentViT:
        """`StudentViT(student)` with the inherited weights, on this supernet's device and in its mode."""
        model = StudentViT(student)
        model.load_state_dict(self.subnet_state_dict(student), strict=True)
        return model.to(self.cls_token.device).train(self.training)


class SubnetRun:
    """One pass of a subnet: `StudentViT`'s forward (kdsearch.models.student: tokens, each
    encoding's hooks, pre-norm blocks) written over the subnet's tensors `t` (names as there)."""

    def __init__(self, student: StudentSpec, t: dict[str, Tensor], buffers: dict[str, Tensor]):
        self.s, self.t, self.buffers = student, t, buffers
        self.d, self.npt = student.embed_dim, student.num_prefix_tokens

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens, the prefix tokens before them, then the encoding's `tokens` hook."""
        t, b = self.t, x.shape[0]
        x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=self.s.patch_size)
        prefix = [t["cls_token"].expand(b, -1, -1)]
        if self.s.distill_token:
            prefix.append(t["dist_token"].expand(b, -1, -1))
        x = torch.cat(prefix + [x.flatten(2).transpose(1, 2)], dim=1)
        if self.s.pos_embed == "learned":
            return x + t["pos_enc.pos_embed"]
        if self.s.pos_embed == "sincos":
            return torch.cat(
                [x[:, : self.npt], x[:, self.npt :] + self.buffers["pos_enc.pos_embed"].to(x.dtype)], dim=1
            )
        return x

    def attn_bias(self, i: int) -> Tensor | None:
        """relpos: the block's bias as timm's `RelPosBias.get_bias` gives it, zero for the prefix tokens."""
        if self.s.pos_embed != "relpos":
            return None
        table = self.t[f"pos_enc.rel_pos.{i}.relative_position_bias_table"]
        index = self.buffers[f"pos_enc.rel_pos.{i}.relative_position_index"]
        n = self.s.num_patches
        bias = table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0).contiguous()
        return F.pad(bias, (self.npt, 0, self.npt, 0))

    def after_block(self, i: int, x: Tensor) -> Tensor:
        """cpe: CPVT's PEG after the first block, a residual depthwise 3x3 convolution."""
        if self.s.pos_embed != "cpe" or i != 0:
            return x
        prefix, patch = x[:, : self.npt], x[:, self.npt :]
        b, n, d = patch.shape
        feat = patch.transpose(1, 2).reshape(b, d, self.s.grid_size, self.s.grid_size)
        feat = F.conv2d(feat, self.t["pos_enc.proj.weight"], self.t["pos_enc.proj.bias"], padding=1, groups=d)
        return torch.cat([prefix, feat.flatten(2).transpose(1, 2) + patch], dim=1)

    def blocks(self, x: Tensor, attn: bool, block_features: bool) -> tuple[Tensor, list[Tensor] | None, Tensor | None]:
        rope = self.buffers.get("pos_enc.rope_embed.pos_embed")
        feats: list[Tensor] | None = [] if block_features else None
        last_attn: Tensor | None = None
        for i in range(self.s.depth):
            x, a = self.block(i, x, rope, self.attn_bias(i), attn and i == self.s.depth - 1)
            x = self.after_block(i, x)
            if feats is not None:
                feats.append(x)
            if a is not None:
                last_attn = a
        return x, feats, last_attn

    def block(
        self, i: int, x: Tensor, rope: Tensor | None, bias: Tensor | None, return_attn: bool
    ) -> tuple[Tensor, Tensor | None]:
        """`kdsearch.models.student.Block` and its `Attention`, over block `i`'s tensors."""
        t, p, d, h = self.t, f"blocks.{i}.", self.d, self.s.num_heads
        b, n, _ = x.shape
        y = F.layer_norm(x, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], LN_EPS)
        qkv = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q = torch.cat([q[:, :, : self.npt], apply_rot_embed_cat(q[:, :, self.npt :], rope)], dim=2).type_as(v)
            k = torch.cat([k[:, :, : self.npt], apply_rot_embed_cat(k[:, :, self.npt :], rope)], dim=2).type_as(v)
        if bias is not None:
            bias = bias.to(q.dtype)
        a: Tensor | None = None
        if not return_attn:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
            a = (logits if bias is None else logits + bias).softmax(dim=-1)
            y = a @ v
        y = F.linear(y.transpose(1, 2).reshape(b, n, d), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        x = x + y
        y = F.layer_norm(x, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], LN_EPS)
        y = F.linear(
            F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
            t[p + "mlp.fc2.weight"],
            t[p + "mlp.fc2.bias"],
        )
        return x + y, a
