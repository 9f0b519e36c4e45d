"""A student carried to another resolution (kdsearch.models.resolution): exact at its own size,
runnable and counted exactly at others, each encoding's table carried its usual way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.models.resolution import CARRIERS, carried_student, carry_student, spec_at
from kdsearch.models.student import POS_ENCODINGS, build_student
from kdsearch.space.flops import count_flops
from kdsearch.space.specs import StudentSpec
from tests.helpers import explicit_attention

# 16 px, patch 4: a 4x4 grid, carried to 3x3 (12 px) and 6x6 (24 px)
TINY = StudentSpec(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
ENCODINGS = [
    pytest.param(dataclasses.replace(TINY, pos_embed=pe, distill_token=dt), id=f"{pe}-{'dist' if dt else 'cls'}")
    for pe in POS_ENCODINGS
    for dt in (False, True)
]


def trained(spec: StudentSpec) -> torch.nn.Module:
    """A student with every weight drawn (timm zero-inits nothing that matters here) in eval mode."""
    torch.manual_seed(0)
    return build_student(spec).eval()


def images(spec: StudentSpec, n: int = 3) -> torch.Tensor:
    return torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(1))


def measured_flops(model: torch.nn.Module) -> int:
    """FlopCounterMode's total for one image with attention on the explicit path (as tests/test_flops.py)."""
    s = model.spec
    with torch.no_grad(), FlopCounterMode(display=False) as counter, explicit_attention(model):
        model(torch.zeros(1, s.in_chans, s.img_size, s.img_size))
    return counter.get_total_flops()


def test_every_encoding_has_a_carrier() -> None:
    assert list(CARRIERS) == list(POS_ENCODINGS)


@pytest.mark.parametrize("spec", ENCODINGS)
def test_carried_to_its_own_size_gives_the_same_logits(spec: StudentSpec) -> None:
    model = trained(spec)
    state = model.state_dict()
    new, carried = carry_student(spec, state, spec.img_size)
    assert new == spec and carried is state
    x = images(spec)
    with torch.no_grad():
        assert torch.equal(carried_student(spec, state, spec.img_size)(x), model(x))


@pytest.mark.parametrize("spec", ENCODINGS)
def test_carried_to_other_sizes_runs_and_is_counted_exactly(spec: StudentSpec) -> None:
    state = trained(spec).state_dict()
    for img_size in (12, 24):
        model = carried_student(spec, state, img_size)
        s = model.spec
        assert s == dataclasses.replace(spec, img_size=img_size) and s.grid_size == img_size // 4
        with torch.no_grad():
            logits = model(images(s))
        assert logits.shape == (3, spec.num_classes) and torch.isfinite(logits).all()
        count = count_flops(s)
        assert measured_flops(model) == count.flops != count_flops(spec).flops
        assert sum(p.numel() for p in model.parameters()) == count.params
        assert not model.training


def test_grid_free_weights_are_carried_unchanged() -> None:
    """Every weight but the learned table is the trained one, bit for bit."""
    spec = dataclasses.replace(TINY, pos_embed="learned", distill_token=True)
    state = trained(spec).state_dict()
    _, carried = carry_student(spec, state, 24)
    assert carried.keys() == state.keys()
    assert all(torch.equal(carried[k], v) for k, v in state.items() if k != "pos_enc.pos_embed")


def smooth_learned(spec: StudentSpec) -> dict[str, torch.Tensor]:
    """A state whose learned table is smooth over the grid (as ViT's trained tables are), prefix rows random."""
    state = trained(spec).state_dict()
    grid = build_sincos2d_pos_embed([spec.grid_size] * 2, spec.embed_dim).unsqueeze(0)
    state["pos_enc.pos_embed"] = torch.cat([state["pos_enc.pos_embed"][:, : spec.num_prefix_tokens], grid], dim=1)
    return state


LEARNED_ROUND_TRIP = 0.05
"""Bicubic up, then antialiased bicubic down, is a low-pass round trip, not an inverse: a
table smooth over the grid comes back within 5% of its norm (measured: 3.4%, 4x4 -> 6x6 -> 4x4);
a table of independent noise does not (measured: 34%, checked below so the bound can fail)."""


def test_learned_table_resampled_up_and_back_is_close() -> None:
    spec = dataclasses.replace(TINY, pos_embed="learned", distill_token=True)
    state = smooth_learned(spec)
    big, up = carry_student(spec, state, 24)
    assert up["pos_enc.pos_embed"].shape == (1, 2 + 36, 16)
    back = carry_student(big, up, 16)[1]["pos_enc.pos_embed"]
    table = state["pos_enc.pos_embed"]
    assert torch.equal(back[:, :2], table[:, :2])  # prefix tokens' rows are kept as they are
    assert (back - table).norm() <= LEARNED_ROUND_TRIP * table[:, 2:].norm()

    noise = trained(spec).state_dict()
    back = carry_student(big, carry_student(spec, noise, 24)[1], 16)[1]["pos_enc.pos_embed"]
    assert (back - noise["pos_enc.pos_embed"]).norm() > LEARNED_ROUND_TRIP * noise["pos_enc.pos_embed"][:, 2:].norm()


def test_relpos_table_resized_up_and_back_keeps_the_near_offsets() -> None:
    """BEiT's resize (timm's resize_rel_pos_bias_table) keeps offsets -1..1 per axis where they are
    and spreads the farther ones along a geometric progression; linear interpolation between them.

    So up and back is exact (to float rounding: 1e-6) on the 3x3 nearest offsets, every value stays
    within the table's range (a convex combination), and the far offsets come back interpolated
    (measured: up to 0.056 on a trunc-normal(.02) table), which is what the method promises.
    """
    spec = dataclasses.replace(TINY, pos_embed="relpos")
    state = trained(spec).state_dict()
    big, up = carry_student(spec, state, 24)
    back = carry_student(big, up, 16)[1]
    for block in range(spec.depth):
        key = f"pos_enc.rel_pos.{block}.relative_position_bias_table"
        assert up[key].shape == (11 * 11, 2)
        table, got = state[key].reshape(7, 7, 2), back[key].reshape(7, 7, 2)
        torch.testing.assert_close(got[2:5, 2:5], table[2:5, 2:5], atol=1e-6, rtol=0)
        assert table.min() <= got.min() and got.max() <= table.max()
        assert table.min() <= up[key].min() and up[key].max() <= table.max()
        assert not torch.equal(got, table)


@pytest.mark.parametrize("img_size", [0, 2, 18, -4, 16.0, True])
def test_an_image_size_off_the_patch_grid_is_one_line(img_size: object) -> None:
    with pytest.raises(ValueError, match=r"^img_size .*: must be a multiple of the student's patch size 4") as e:
        carry_student(TINY, {}, img_size)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    assert spec_at(TINY, 4).grid_size == 1
