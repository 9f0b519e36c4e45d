"""The student ViT: every positional encoding x distillation token x three sizes."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from kdsearch.models.student import (
    POS_ENCODINGS,
    Attention,
    StudentOutput,
    build_student,
    create_pos_encoding,
)
from kdsearch.space.encodings import ENCODINGS, get_encoding
from kdsearch.space.specs import POS_EMBEDS, StudentSpec
from tests.helpers import GRID, SIZES, explicit_attention, set_fused_attn


def _images(spec: StudentSpec, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    batch = batch or (1 if spec.img_size >= 224 else 3)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=g)


def _model(spec: StudentSpec, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(spec)


@pytest.mark.parametrize("spec", GRID)
def test_train_forward_backward_reaches_every_parameter(spec: StudentSpec) -> None:
    model = _model(spec).train()
    x = _images(spec)
    out = model(x)
    if spec.distill_token:
        assert isinstance(out, tuple) and len(out) == 2
        for o in out:
            assert o.shape == (x.shape[0], spec.num_classes)
        loss = out[0].logsumexp(-1).sum() + out[1].logsumexp(-1).sum()
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (x.shape[0], spec.num_classes)
        loss = out.logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    dead = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    if spec.pos_embed == "relpos":
        # Prefix tokens get no relative bias, so the last block's table only moves patch
        # tokens, which the heads never read: no gradient from a logits-only loss. (Feature
        # distillation on all tokens does reach it.)
        assert dead == [f"pos_enc.rel_pos.{spec.depth - 1}.relative_position_bias_table"]
    else:
        assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("spec", GRID)
def test_eval_outputs_distill_access_and_fused_equals_explicit(spec: StudentSpec) -> None:
    model = _model(spec).eval()
    x = _images(spec)
    b, t = x.shape[0], spec.num_patches + spec.num_prefix_tokens
    with torch.no_grad():
        fused = model(x)
        with explicit_attention(model):
            explicit = model(x)
        out = model.forward_distill(x, attn=True, block_features=True)
    assert fused.shape == (b, spec.num_classes)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    assert all(m.fused_attn for m in model.modules() if isinstance(m, Attention)), "context manager restores"

    assert isinstance(out, StudentOutput)
    assert out.tokens.shape == (b, t, spec.embed_dim)
    assert out.attn.shape == (b, spec.num_heads, t, t)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(b, spec.num_heads, t))
    assert len(out.block_features) == spec.depth
    assert all(f.shape == (b, t, spec.embed_dim) for f in out.block_features)
    if spec.distill_token:
        assert out.dist_logits.shape == (b, spec.num_classes)
        torch.testing.assert_close((out.logits + out.dist_logits) / 2, fused, rtol=1e-4, atol=1e-5)
    else:
        assert out.dist_logits is None
        torch.testing.assert_close(out.logits, fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), fused)


@pytest.mark.parametrize("pe", POS_EMBEDS)
def test_forward_distill_defaults_and_heads_in_train_mode(pe: str) -> None:
    spec = dataclasses.replace(SIZES["tiny"], pos_embed=pe, distill_token=True)
    model = _model(spec).train()
    x = _images(spec)
    out = model.forward_distill(x)
    assert out.attn is None and out.block_features is None
    cls_logits, dist_logits = model(x)
    torch.testing.assert_close(out.logits, cls_logits)
    torch.testing.assert_close(out.dist_logits, dist_logits)


def test_attn_request_makes_only_the_last_block_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(SIZES["small"], pos_embed="relpos", distill_token=True)
    model = _model(spec).eval()
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model.forward_distill(_images(spec), attn=True)
    assert len(calls) == spec.depth - 1
    assert all(mask is not None for mask in calls), "relpos bias goes to SDPA as attn_mask"
    calls.clear()
    set_fused_attn(model, False)
    with torch.no_grad():
        model(_images(spec))
    assert calls == []
    set_fused_attn(model, True)
    with torch.no_grad():
        model(_images(spec))
    assert len(calls) == spec.depth


def _shuffle_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """Move whole patches of `x` to new grid places: patch i goes where perm says."""
    b, c, h, w = x.shape
    g = h // patch
    tiles = x.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, patch, patch)
    tiles = tiles[:, perm]
    return tiles.reshape(b, g, g, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("pe", POS_EMBEDS)
def test_only_none_is_blind_to_patch_order(pe: str) -> None:
    """Without positions the class logits are invariant to shuffling patches; every encoding breaks that."""
    spec = dataclasses.replace(SIZES["tiny"], pos_embed=pe)
    model = _model(spec).eval()
    if pe == "relpos":  # its std-.02 init moves the logits by only ~1e-6; make the effect visible
        for table in model.pos_enc.rel_pos:
            torch.nn.init.normal_(table.relative_position_bias_table, std=1.0)
    x = _images(spec)
    perm = torch.randperm(spec.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), model(_shuffle_patches(x, spec.patch_size, perm))
    if pe == "none":
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert (a - b).abs().max() > 1e-4, f"{pe} does not see patch positions"


def test_shuffle_helper_is_a_patch_permutation() -> None:
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    ident = torch.arange(16)
    assert torch.equal(_shuffle_patches(x, 4, ident), x)
    assert not torch.equal(_shuffle_patches(x, 4, ident.flip(0)), x)


def test_pos_encoding_parts() -> None:
    base = dataclasses.replace(SIZES["tiny"], distill_token=True)
    n, t, d = base.num_patches, base.num_patches + 2, base.embed_dim

    learned = _model(dataclasses.replace(base, pos_embed="learned"))
    assert learned.pos_enc.pos_embed.shape == (1, t, d) and learned.pos_enc.pos_embed.requires_grad

    sincos = _model(dataclasses.replace(base, pos_embed="sincos"))
    names = {name for name, _ in sincos.named_parameters()}
    assert not any("pos" in name for name in names), "sincos is fixed, not a parameter"
    assert sincos.pos_enc.pos_embed.shape == (1, n, d)

    relpos = _model(dataclasses.replace(base, pos_embed="relpos"))
    assert len(relpos.pos_enc.rel_pos) == base.depth
    bias = relpos.pos_enc.attn_bias(0)
    assert bias.shape == (1, base.num_heads, t, t)
    assert bias[:, :, :2].abs().sum() == 0 and bias[:, :, :, :2].abs().sum() == 0, "prefix rows/cols unbiased"
    assert bias[:, :, 2:, 2:].abs().sum() > 0

    rope = _model(dataclasses.replace(base, pos_embed="rope"))
    assert rope.pos_enc.rope().shape == (n, 2 * base.head_dim)
    assert sum(p.numel() for p in rope.pos_enc.parameters()) == 0

    cpe = _model(dataclasses.replace(base, pos_embed="cpe"))
    x = torch.randn(2, t, d)
    y = cpe.pos_enc.after_block(0, x)
    assert torch.equal(y[:, :2], x[:, :2]), "prefix tokens untouched by the PEG"
    assert not torch.equal(y[:, 2:], x[:, 2:])
    assert torch.equal(cpe.pos_enc.after_block(1, x), x), "PEG only after the first block"


def test_rope_leaves_prefix_tokens_unrotated() -> None:
    spec = dataclasses.replace(SIZES["tiny"], pos_embed="rope", distill_token=True)
    model = _model(spec).eval()
    attn = model.blocks[0].attn
    x = torch.randn(1, spec.num_patches + 2, spec.embed_dim)
    rope = model.pos_enc.rope()
    with torch.no_grad():
        with_rope, a1 = attn(x, rope=rope, return_attn=True)
        without, a0 = attn(x, return_attn=True)

    # log p_ij - log p_i0 = logit_ij - logit_i0, free of the softmax normaliser: among the two
    # prefix tokens (cls, dist) the logits are the same with and without rope.
    def rel(a):
        return a[..., :2, :2].log() - a[..., :2, :1].log()

    torch.testing.assert_close(rel(a1), rel(a0))
    assert not torch.allclose(a1, a0)


def test_unknown_pos_embed_raises_value_error() -> None:
    bad = StudentSpec(pos_embed="alibi")
    with pytest.raises(ValueError, match="alibi"):
        build_student(bad)
    expected = re.escape("'alibi'; expected one of " + ", ".join(ENCODINGS))
    with pytest.raises(ValueError, match=expected):
        create_pos_encoding("alibi", StudentSpec())
    with pytest.raises(ValueError, match=expected):
        get_encoding("alibi")


def test_the_layers_registry_has_the_tables_names() -> None:
    """Each row of the encodings table has its layers, and each layer class its row."""
    assert POS_ENCODINGS.keys() == ENCODINGS.keys()
    assert POS_EMBEDS == tuple(ENCODINGS)


@pytest.mark.parametrize("name", [name for name, e in ENCODINGS.items() if e.width_rule is not None])
def test_each_width_rule_refuses_the_widths_it_names(name: str) -> None:
    """One head, so embed_dim is head_dim: a multiple of the rule builds and runs, one more is refused."""
    rule = ENCODINGS[name].width_rule
    base = dataclasses.replace(SIZES["tiny"], pos_embed=name, num_heads=1)
    good = dataclasses.replace(base, embed_dim=2 * rule.multiple)
    assert good.problems() == []
    assert _model(good)(_images(good)).shape == (3, good.num_classes)
    bad = dataclasses.replace(base, embed_dim=2 * rule.multiple + 1)
    detail = f"{name} needs {rule.dim} divisible by {rule.multiple}, got {rule.dim} {bad.embed_dim}"
    assert bad.problems() == [f"pos_embed {detail}"]
    with pytest.raises(ValueError, match=re.escape(detail)):
        build_student(bad)


def test_invalid_spec_raises_value_error() -> None:
    with pytest.raises(ValueError, match="divide"):
        build_student(StudentSpec(img_size=10, patch_size=4))


def test_deterministic_under_manual_seed() -> None:
    spec = dataclasses.replace(SIZES["small"], pos_embed="relpos", distill_token=True)
    a, b = _model(spec, seed=3).state_dict(), _model(spec, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _model(spec, seed=4).state_dict()
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_spec_is_stored_and_timm_init() -> None:
    spec = dataclasses.replace(SIZES["small"], distill_token=True)
    model = _model(spec)
    assert model.spec is spec
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.head.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert model.blocks[0].norm1.eps == 1e-6
    w = model.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025  # timm's trunc_normal_(std=.02): cut at +-2 absolute, so ~N(0, .02)


def test_relpos_last_table_learns_from_token_features() -> None:
    spec = dataclasses.replace(SIZES["tiny"], pos_embed="relpos", distill_token=True)
    model = _model(spec).train()
    model.forward_distill(_images(spec)).tokens.square().sum().backward()
    assert all(t.relative_position_bias_table.grad.abs().sum() > 0 for t in model.pos_enc.rel_pos)
