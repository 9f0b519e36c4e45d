"""The distillation losses against values worked out by hand (math.log, not the module's torch calls)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdsearch.models.student import StudentOutput
from kdsearch.space.specs import RecipeSpec
from kdsearch.train.distill import DistillLoss, attention_kl, feature_mse, hard_distill, label_ce, soft_kl
from kdsearch.train.teacher import TeacherOutput

LN3, LN4 = math.log(3.0), math.log(4.0)


def t(x: object, **kw: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, **kw)  # type: ignore[arg-type]


def identity_linear(d: int) -> nn.Linear:
    lin = nn.Linear(d, d).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    return lin


# --------------------------------------------------------------------------- label_ce, hard_distill


def test_label_ce_by_hand() -> None:
    # softmax([ln 3, 0]) = [3/4, 1/4]: -log(3/4) for label 0, -log(1/4) for label 1; mean of the two.
    logits = t([[LN3, 0.0], [LN3, 0.0]])
    got = label_ce(logits, torch.tensor([0, 1]))
    assert got.item() == pytest.approx((math.log(4 / 3) + LN4) / 2, rel=1e-12)


def test_hard_distill_by_hand() -> None:
    # teacher argmax is class 1, where the student puts 1/4.
    got = hard_distill(t([[LN3, 0.0]]), t([[0.0, 5.0]]))
    assert got.item() == pytest.approx(LN4, rel=1e-12)


def test_hard_distill_is_label_ce_with_teacher_argmax() -> None:
    torch.manual_seed(0)
    s, te = torch.randn(8, 10), torch.randn(8, 10)
    torch.testing.assert_close(hard_distill(s, te), label_ce(s, te.argmax(dim=1)))


def test_hard_distill_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        hard_distill(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- soft_kl


KL_HAND = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL([3/4, 1/4] || [1/2, 1/2])


def test_soft_kl_by_hand_t1() -> None:
    assert soft_kl(t([[0.0, 0.0]]), t([[LN3, 0.0]]), 1.0).item() == pytest.approx(KL_HAND, rel=1e-12)


def test_soft_kl_by_hand_t2_scales_by_t_squared() -> None:
    # teacher / 2 = [ln 3, 0]: the same distributions as at T=1, times T^2 = 4.
    assert soft_kl(t([[0.0, 0.0]]), t([[2 * LN3, 0.0]]), 2.0).item() == pytest.approx(4 * KL_HAND, rel=1e-12)


def test_soft_kl_is_batchmean() -> None:
    # second row: student == teacher, KL 0; summed over classes, divided by B = 2.
    got = soft_kl(t([[0.0, 0.0], [1.0, 2.0]]), t([[LN3, 0.0], [1.0, 2.0]]), 1.0)
    assert got.item() == pytest.approx(KL_HAND / 2, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_soft_kl_zero_when_student_is_teacher(temperature: float) -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 10) * 5
    assert abs(soft_kl(x, x.clone(), temperature).item()) < 1e-6


def test_soft_kl_large_t_limit() -> None:
    # KL(softmax(t/T) || softmax(s/T)) ~ (1/2T^2) (1/K) sum_k (d_k - mean d)^2, d = t - s: the T^2 factor
    # makes the loss tend to a constant, so it neither vanishes nor explodes with T.
    torch.manual_seed(2)
    s, te = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    limit = sum(sum((dk - sum(row) / 5) ** 2 for dk in row) / (2 * 5) for row in (te - s).tolist()) / 4
    for temperature in (1e3, 1e4):
        assert soft_kl(s, te, temperature).item() == pytest.approx(limit, rel=5e-3)
    a, b = soft_kl(s, te, 200.0).item(), soft_kl(s, te, 400.0).item()
    assert a == pytest.approx(b, rel=2e-2)


def test_soft_kl_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        soft_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_soft_kl_mixed_precision_inputs() -> None:
    # teacher logits cached in half precision, student in float32: computed in float32.
    torch.manual_seed(3)
    s, te = torch.randn(4, 10), torch.randn(4, 10)
    got = soft_kl(s, te.half(), 4.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, soft_kl(s, te.half().float(), 4.0))


# --------------------------------------------------------------------------- feature_mse


def test_feature_mse_same_grid_identity_projector_is_plain_mse() -> None:
    torch.manual_seed(4)
    st, tt = torch.randn(2, 16, 3, dtype=torch.float64), torch.randn(2, 16, 3, dtype=torch.float64)
    expected = sum((a - b) ** 2 for a, b in zip(st.flatten().tolist(), tt.flatten().tolist())) / st.numel()
    proj = identity_linear(3)
    assert feature_mse(st, tt, proj).item() == pytest.approx(expected, rel=1e-12)
    # the same teacher as a (B, Dt, h, w) map: tokens are row-major on the grid
    tmap = tt.transpose(1, 2).reshape(2, 3, 4, 4)
    assert feature_mse(st, tmap, proj).item() == pytest.approx(expected, rel=1e-12)


def test_feature_mse_resizes_bilinearly_by_hand() -> None:
    # student 2x2 map [[0, 4], [0, 4]] (Dt = 1). Bilinear, align_corners=False, 2 -> 4 along a row:
    # source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> (clamped) [0, 1, 3, 4].
    st = t([[[0.0], [4.0], [0.0], [4.0]]])
    proj = identity_linear(1)
    zeros = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    assert feature_mse(st, zeros, proj).item() == pytest.approx((0 + 1 + 9 + 16) / 4, rel=1e-12)
    # a non-square CNN map (h, w) = (4, 2): the columns stay [0, 4], rows are constant in height
    assert feature_mse(st, torch.zeros(1, 1, 4, 2, dtype=torch.float64), proj).item() == pytest.approx(8.0)
    # teacher as tokens on a 4x4 grid
    assert feature_mse(st, torch.zeros(1, 16, 1, dtype=torch.float64), proj).item() == pytest.approx(6.5)


def test_feature_mse_constant_map_with_learned_projector() -> None:
    # every student token is the same vector, so the projected map is constant per channel
    # and stays so after any bilinear resize: the loss is mean over channels of (c - k)^2.
    torch.manual_seed(5)
    proj = nn.Linear(2, 3).double()
    v = [0.5, -1.5]
    st = t([[v] * 9, [v] * 9])  # (2, 9, 2): a 3x3 grid
    k = [1.0, -2.0, 0.25]
    teacher = t(k).view(1, 3, 1, 1).expand(2, 3, 5, 7).contiguous()
    w, b = proj.weight.tolist(), proj.bias.tolist()
    c = [w[i][0] * v[0] + w[i][1] * v[1] + b[i] for i in range(3)]
    expected = sum((ci - ki) ** 2 for ci, ki in zip(c, k)) / 3
    assert feature_mse(st, teacher, proj).item() == pytest.approx(expected, rel=1e-10)


def test_feature_mse_downsizes_student_grid_larger_than_teacher() -> None:
    # student 8x8 grid -> teacher 2x2 map. Bilinear, align_corners=False, no antialias, 8 -> 2:
    # source x = (i + 0.5) * 4 - 0.5 = 1.5, 5.5, so output (a, b) is the mean of the 2x2 block
    # at rows and columns {4a + 1, 4a + 2} x {4b + 1, 4b + 2}; an antialiased resize, an area mean
    # over the 4x4 block or a nearest pick give other values on a grid of random numbers.
    torch.manual_seed(6)
    b, dt, g = 3, 2, 8
    st = torch.randn(b, g * g, dt, dtype=torch.float64)
    teacher = torch.randn(b, dt, 2, 2, dtype=torch.float64)
    s, tv = st.tolist(), teacher.tolist()
    squares = []
    for n in range(b):
        for c in range(dt):
            for a in range(2):
                for col in range(2):
                    block = [s[n][r * g + q][c] for r in (4 * a + 1, 4 * a + 2) for q in (4 * col + 1, 4 * col + 2)]
                    squares.append((sum(block) / 4 - tv[n][c][a][col]) ** 2)
    expected = sum(squares) / len(squares)
    got = feature_mse(st, teacher, identity_linear(dt))
    assert got.dim() == 0 and got.item() == pytest.approx(expected, rel=1e-12)
    # a learned projector is applied to every token before the resize (both are linear: the same as after)
    torch.manual_seed(7)
    proj = nn.Linear(5, dt).double()
    tokens = torch.randn(b, g * g, 5, dtype=torch.float64)
    assert feature_mse(tokens, teacher, proj).item() == pytest.approx(
        feature_mse(proj(tokens).detach(), teacher, identity_linear(dt)).item(), rel=1e-12
    )


def test_feature_mse_rejects_bad_shapes() -> None:
    proj = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="square"):
        feature_mse(torch.zeros(1, 6, 4), torch.zeros(1, 4, 2, 2), proj)
    with pytest.raises(ValueError, match="square"):
        feature_mse(torch.zeros(1, 4, 4), torch.zeros(1, 5, 4), proj)
    with pytest.raises(ValueError, match="does not match"):
        feature_mse(torch.zeros(1, 4, 4), torch.zeros(1, 3, 2, 2), proj)
    with pytest.raises(ValueError, match="teacher_features"):
        feature_mse(torch.zeros(1, 4, 4), torch.zeros(4, 4), proj)


# --------------------------------------------------------------------------- attention_kl

HALF_LN = 0.5 * math.log(1.5625)  # KL(uniform over 4 || [.4, .4, .1, .1]) = .25 * (2 ln .625 + 2 ln 2.5)


def uniform_attn(b: int, h: int, n: int) -> torch.Tensor:
    return torch.full((b, h, n, n), 1.0 / n, dtype=torch.float64)


def random_attn(b: int, h: int, n: int) -> torch.Tensor:
    return torch.randn(b, h, n, n, dtype=torch.float64).softmax(-1)


def test_attention_kl_zero_for_identical_maps() -> None:
    torch.manual_seed(7)
    a = random_attn(2, 3, 17)
    assert abs(attention_kl(a, a.clone(), 1, 1).item()) < 1e-9


def test_attention_kl_by_hand_mean_over_batch_and_queries() -> None:
    # 2x2 grid, no prefix. Only query 0 of batch 0 differs from the uniform teacher.
    s = uniform_attn(2, 1, 4)
    s[0, 0, 0] = t([0.4, 0.4, 0.1, 0.1])
    got = attention_kl(s, uniform_attn(2, 1, 4), 0, 0)
    assert got.item() == pytest.approx(HALF_LN / 8, rel=1e-6)


def test_attention_kl_direction_is_teacher_to_student() -> None:
    # KL([.4, .4, .1, .1] || uniform) = .8 ln 1.6 + .2 ln .4, not HALF_LN
    te = t([0.4, 0.4, 0.1, 0.1]).expand(1, 1, 4, 4).contiguous()
    got = attention_kl(uniform_attn(1, 1, 4), te, 0, 0)
    assert got.item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-6)


def test_attention_kl_averages_heads_and_head_counts_may_differ() -> None:
    # student heads average to [.4, .4, .1, .1] on every row; teacher's three heads average to uniform.
    s = torch.stack([t([0.6, 0.2, 0.1, 0.1]), t([0.2, 0.6, 0.1, 0.1])]).view(1, 2, 1, 4).expand(1, 2, 4, 4)
    te = torch.stack([t([0.4, 0.2, 0.2, 0.2]), t([0.1, 0.3, 0.3, 0.3]), t([0.25] * 4)]).view(1, 3, 1, 4)
    got = attention_kl(s, te.expand(1, 3, 4, 4), 0, 0)
    assert got.item() == pytest.approx(HALF_LN, rel=1e-6)


def test_attention_kl_drops_prefix_tokens_and_renormalizes() -> None:
    # teacher: 1 prefix token, patch rows [.2 | .2 .2 .2 .2] -> uniform after dropping the cls key.
    # student: 2 prefix tokens, patch rows [.1 .1 | .32 .32 .08 .08] -> [.4 .4 .1 .1].
    # The prefix query rows hold anything: they are dropped.
    te = torch.full((1, 1, 5, 5), 0.2, dtype=torch.float64)
    te[0, 0, 0] = t([0.9, 0.1, 0.0, 0.0, 0.0])
    s = t([0.1, 0.1, 0.32, 0.32, 0.08, 0.08]).expand(1, 1, 6, 6).clone()
    s[0, 0, :2] = t([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert attention_kl(s, te, 2, 1).item() == pytest.approx(HALF_LN, rel=1e-6)


def test_attention_kl_student_grid_1x1_resized_to_teacher_2x2() -> None:
    # a 1x1 student map resizes to a constant map: uniform rows after renormalisation.
    s = torch.ones(1, 2, 2, 2, dtype=torch.float64) / 2  # cls + 1 patch
    te = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    te[..., 1:] = t([0.4, 0.4, 0.1, 0.1])
    te[..., 0] = 0.0
    got = attention_kl(s, te, 1, 1)
    assert got.item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-6)


def test_attention_kl_resizes_key_axis_by_hand() -> None:
    # student 2x2 grid: every query attends keys [[.4, .4], [.1, .1]]. Resized to 4x4, each column
    # reads [.4, .325, .175, .1] top to bottom (see the feature_mse test); the 16 entries sum to 4,
    # so the row renormalises to [.1, .08125, .04375, .025] (x4 columns). Teacher: uniform 1/16.
    s = t([0.4, 0.4, 0.1, 0.1]).expand(1, 1, 4, 4)
    expected = 0.25 * sum(math.log(0.0625 / x) for x in (0.1, 0.08125, 0.04375, 0.025))
    got = attention_kl(s, uniform_attn(1, 1, 16), 0, 0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def _bilinear_weights(n_in: int, n_out: int) -> list[list[float]]:
    """Row i: weights of the n_in source pixels for output pixel i (align_corners=False)."""
    rows = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        row = [0.0] * n_in
        row[i0] += 1 - lam
        row[i1] += lam
        rows.append(row)
    return rows


def _reference_attention_kl(s: list, te: list, sp: int, tp: int) -> float:
    """attention_kl written with Python loops over nested lists."""

    def patch_mean(a: list, p: int) -> list:
        heads = len(a)
        n = len(a[0]) - p
        return [[sum(a[h][p + q][p + k] for h in range(heads)) / heads for k in range(n)] for q in range(n)]

    def renorm(row: list) -> list:
        row = [max(x, 1e-8) for x in row]
        tot = sum(row)
        return [x / tot for x in row]

    total, count = 0.0, 0
    for sb, tb in zip(s, te):
        a, b = patch_mean(sb, sp), patch_mean(tb, tp)
        gs, gt = math.isqrt(len(a)), math.isqrt(len(b))
        w = _bilinear_weights(gs, gt)
        # resized[(qy, qx)][(ky, kx)] = sum w[qy][sy] w[qx][sx] w[ky][ty] w[kx][tx] a[(sy, sx)][(ty, tx)]
        big = [
            [
                sum(
                    w[qy][sy] * w[qx][sx] * w[ky][ty] * w[kx][tx] * a[sy * gs + sx][ty * gs + tx]
                    for sy in range(gs)
                    for sx in range(gs)
                    for ty in range(gs)
                    for tx in range(gs)
                )
                for ky in range(gt)
                for kx in range(gt)
            ]
            for qy in range(gt)
            for qx in range(gt)
        ]
        for prow, trow in zip(big, b):
            ps, pt = renorm(prow), renorm(trow)
            total += sum(x * math.log(x / y) for x, y in zip(pt, ps))
            count += 1
    return total / count


@pytest.mark.parametrize(
    ("gs", "gt", "hs", "ht", "sp", "tp"), [(2, 3, 2, 3, 1, 2), (3, 2, 1, 4, 2, 0), (2, 4, 3, 1, 0, 1)]
)
def test_attention_kl_resizes_both_axes_like_a_reference(gs: int, gt: int, hs: int, ht: int, sp: int, tp: int) -> None:
    torch.manual_seed(8)
    s = random_attn(2, hs, gs * gs + sp)
    te = random_attn(2, ht, gt * gt + tp)
    expected = _reference_attention_kl(s.tolist(), te.tolist(), sp, tp)
    assert attention_kl(s, te, sp, tp).item() == pytest.approx(expected, rel=1e-9)


def test_attention_kl_resized_student_matching_teacher_gives_zero() -> None:
    # student rows depend on the query (top row of queries vs bottom row): if the teacher is exactly
    # the student's map resized on both axes, the loss is 0; resizing only one axis would not give 0.
    top, bottom = [0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]
    s = t([top, top, bottom, bottom]).view(1, 1, 4, 4)
    w = _bilinear_weights(2, 4)
    resized = [
        [
            sum(w[qy][sy] * w[ky][ty] * s[0, 0, sy * 2, ty * 2].item() for sy in range(2) for ty in range(2)) / 4
            for ky in range(4)
            for _ in range(4)
        ]
        for qy in range(4)
        for _ in range(4)
    ]
    te = t(resized).view(1, 1, 16, 16)
    assert attention_kl(s, te, 0, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_kl_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        attention_kl(uniform_attn(1, 1, 6), uniform_attn(1, 1, 5), 1, 1)  # 5 student patches
    with pytest.raises(ValueError, match="prefix"):
        attention_kl(uniform_attn(1, 1, 5), uniform_attn(1, 1, 5), 5, 1)
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        attention_kl(torch.ones(1, 5, 5), uniform_attn(1, 1, 5), 1, 1)


# --------------------------------------------------------------------------- DistillLoss

B, K, DS, DT = 4, 5, 6, 3
FULL = RecipeSpec(alpha=0.3, temperature=2.0, hard_weight=0.5, feature_weight=0.7, attention_weight=0.2)


def batch(seed: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        logits=torch.randn(B, K, generator=g, requires_grad=True),
        labels=torch.randint(0, K, (B,), generator=g),
        teacher_logits=torch.randn(B, K, generator=g),
        student_tokens=torch.randn(B, 16, DS, generator=g, requires_grad=True),  # 4x4 grid
        teacher_features=torch.randn(B, DT, 2, 2, generator=g),  # a CNN map
        student_attn=torch.randn(B, 2, 17, 17, generator=g).softmax(-1),  # cls + 16
        teacher_attn=torch.randn(B, 3, 11, 11, generator=g).softmax(-1),  # cls + dist + 9
    )


def outputs(
    x: dict[str, torch.Tensor | None], dist_logits: torch.Tensor | None = None
) -> tuple[StudentOutput, torch.Tensor | None, TeacherOutput]:
    """The batch as the models hand it to the loss: the student's tokens with one prefix
    token in front of its 16 patch tokens, the teacher's attention with two."""
    tokens = x["student_tokens"]
    if tokens is not None:
        tokens = torch.cat([torch.zeros(B, 1, DS), tokens], dim=1)
    student = StudentOutput(x["logits"], dist_logits, tokens, None, x["student_attn"], num_prefix_tokens=1)
    teacher = TeacherOutput(x["teacher_logits"], x["teacher_features"], x["teacher_attn"], num_prefix_tokens=2)
    return student, x["labels"], teacher


def call(loss: DistillLoss, inputs: dict[str, torch.Tensor | None], **kw: object) -> tuple[torch.Tensor, dict]:
    return loss(*outputs(inputs, **kw))


def test_full_recipe_total_is_weighted_sum_of_parts() -> None:
    torch.manual_seed(10)
    loss = DistillLoss(FULL, student_dim=DS, teacher_dim=DT)
    total, parts = call(loss, batch())
    assert set(parts) == {"label", "soft", "hard", "feature", "attention", "total"}
    assert all(type(v) is float for v in parts.values())
    expected = (
        0.7 * parts["label"]
        + 0.3 * parts["soft"]
        + 0.5 * parts["hard"]
        + 0.7 * parts["feature"]
        + 0.2 * parts["attention"]
    )
    assert parts["total"] == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(parts["total"])
    x = batch()
    assert parts["soft"] == pytest.approx(soft_kl(x["logits"], x["teacher_logits"], 2.0).item(), rel=1e-6)
    assert parts["attention"] == pytest.approx(attention_kl(x["student_attn"], x["teacher_attn"], 1, 2).item())
    assert parts["feature"] == pytest.approx(
        feature_mse(x["student_tokens"], x["teacher_features"], loss.projector).item()  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("changes", "removed", "unused_inputs"),
    [
        ({"alpha": 1.0}, {"label"}, ["labels"]),
        ({"alpha": 0.0, "hard_weight": 0.0}, {"soft", "hard"}, ["teacher_logits"]),
        ({"alpha": 0.0}, {"soft"}, []),
        ({"hard_weight": 0.0}, {"hard"}, []),
        ({"feature_weight": 0.0}, {"feature"}, ["student_tokens", "teacher_features"]),
        ({"attention_weight": 0.0}, {"attention"}, ["student_attn", "teacher_attn"]),
    ],
)
def test_zero_weight_removes_term_and_its_inputs(changes: dict, removed: set, unused_inputs: list) -> None:
    torch.manual_seed(11)
    recipe = RecipeSpec(**{**FULL.__dict__, **changes})
    loss = DistillLoss(recipe, student_dim=DS, teacher_dim=DT)
    inputs: dict[str, torch.Tensor | None] = dict(batch())
    for name in unused_inputs:
        inputs[name] = None
    _, parts = call(loss, inputs)
    assert set(parts) == {"label", "soft", "hard", "feature", "attention", "total"} - removed


def test_projector_only_with_feature_weight() -> None:
    assert DistillLoss(RecipeSpec()).projector is None
    assert list(DistillLoss(RecipeSpec()).parameters()) == []
    loss = DistillLoss(RecipeSpec(feature_weight=1.0), student_dim=DS, teacher_dim=DT)
    assert isinstance(loss.projector, nn.Linear)
    assert (loss.projector.in_features, loss.projector.out_features) == (DS, DT)
    with pytest.raises(ValueError, match="student_dim"):
        DistillLoss(RecipeSpec(feature_weight=1.0))


def test_needs_properties() -> None:
    r = DistillLoss(RecipeSpec(alpha=0.0))
    assert (r.needs_features, r.needs_attention) == (False, False)
    full = DistillLoss(FULL, student_dim=DS, teacher_dim=DT)
    assert (full.needs_features, full.needs_attention) == (True, True)


def test_alpha_zero_is_exactly_label_ce() -> None:
    x = batch()
    total, parts = DistillLoss(RecipeSpec(alpha=0.0))(outputs(x)[0], x["labels"])
    assert torch.equal(total, label_ce(x["logits"], x["labels"]))
    assert set(parts) == {"label", "total"}


def test_alpha_one_is_exactly_soft_kl() -> None:
    x = batch()
    student, _, teacher = outputs(x)
    total, parts = DistillLoss(RecipeSpec(alpha=1.0, temperature=3.0))(student, None, teacher)
    assert torch.equal(total, soft_kl(x["logits"], x["teacher_logits"], 3.0))
    assert set(parts) == {"soft", "total"}


def test_dist_logits_take_the_teacher_terms_and_logits_the_label_term() -> None:
    x = batch()
    dist = torch.randn(B, K, requires_grad=True)
    loss = DistillLoss(RecipeSpec(alpha=0.5, temperature=2.0, hard_weight=1.0))
    _, parts = call(loss, x, dist_logits=dist)
    assert parts["label"] == pytest.approx(label_ce(x["logits"], x["labels"]).item())
    assert parts["soft"] == pytest.approx(soft_kl(dist, x["teacher_logits"], 2.0).item())
    assert parts["hard"] == pytest.approx(hard_distill(dist, x["teacher_logits"]).item())
    assert parts["soft"] != pytest.approx(soft_kl(x["logits"], x["teacher_logits"], 2.0).item())
    # with only teacher terms, the class head gets no gradient and the distillation head does
    x["labels"] = None
    total, _ = call(DistillLoss(RecipeSpec(alpha=1.0)), x, dist_logits=dist)
    total.backward()
    assert x["logits"].grad is None
    assert dist.grad is not None and dist.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("recipe", "missing"),
    [
        (RecipeSpec(alpha=0.5), "labels"),
        (RecipeSpec(alpha=0.5), "teacher_logits"),
        (RecipeSpec(alpha=0.0, hard_weight=1.0), "teacher_logits"),
        (RecipeSpec(alpha=0.0, feature_weight=1.0), "student_tokens"),
        (RecipeSpec(alpha=0.0, feature_weight=1.0), "teacher_features"),
        (RecipeSpec(alpha=0.0, attention_weight=1.0), "student_attn"),
        (RecipeSpec(alpha=0.0, attention_weight=1.0), "teacher_attn"),
    ],
)
def test_missing_input_raises_value_error_naming_it(recipe: RecipeSpec, missing: str) -> None:
    loss = DistillLoss(recipe, student_dim=DS, teacher_dim=DT)
    inputs: dict[str, torch.Tensor | None] = dict(batch())
    inputs[missing] = None
    with pytest.raises(ValueError, match=missing):
        call(loss, inputs)


def test_gradients_reach_projector_and_student_not_teacher() -> None:
    torch.manual_seed(12)
    loss = DistillLoss(FULL, student_dim=DS, teacher_dim=DT)
    x = batch()
    for name in ("teacher_logits", "teacher_features", "teacher_attn"):
        x[name].requires_grad_(True)
    x["student_attn"].requires_grad_(True)
    total, _ = call(loss, x)
    total.backward()
    assert loss.projector is not None
    assert loss.projector.weight.grad is not None and loss.projector.weight.grad.abs().sum() > 0
    assert loss.projector.bias.grad is not None and loss.projector.bias.grad.abs().sum() > 0
    for name in ("logits", "student_tokens", "student_attn"):
        assert x[name].grad is not None and x[name].grad.abs().sum() > 0, name
    for name in ("teacher_logits", "teacher_features", "teacher_attn"):
        assert x[name].grad is None, name


def test_recipe_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        DistillLoss(RecipeSpec(alpha=1.5))
    with pytest.raises(ValueError, match="temperature"):
        DistillLoss(RecipeSpec(alpha=0.5, temperature=0.0))
    with pytest.raises(ValueError, match="hard_weight"):
        DistillLoss(RecipeSpec(hard_weight=-1.0))
