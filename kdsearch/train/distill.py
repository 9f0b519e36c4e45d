"""Distillation losses: label CE, Hinton soft KL, DeiT hard distillation, feature MSE, attention KL.

Pure torch, no model building; `DistillLoss` combines the terms of a `RecipeSpec`:

    total = (1 - alpha)        * label_ce(cls, labels)
            + alpha            * soft_kl(kd, teacher_logits, T)
            + hard_weight      * hard_distill(kd, teacher_logits)
            + feature_weight   * feature_mse(student_tokens, teacher_features, projector)
            + attention_weight * attention_kl(student_attn, teacher_attn, ...)

where `cls` is the class head's logits and `kd` the distillation token's head's logits when
the student has one (DeiT), else the class head's. A term whose weight is 0 is not computed.

Shapes: B batch, K classes, N / M patch tokens on a square grid g x g (row-major, as timm's
`PatchEmbed` flattens), H heads, T = prefix + N tokens, Ds / Dt student / teacher widths.
Every loss returns a 0-dim tensor. Half-precision inputs are upcast to float32 first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.space.specs import RecipeSpec

__all__ = [
    "ATTN_EPS",
    "DistillLoss",
    "attention_kl",
    "feature_mse",
    "hard_distill",
    "label_ce",
    "soft_kl",
]

ATTN_EPS = 1e-8
"""Floor on attention probabilities before each row is renormalised (keeps log finite)."""


def _upcast(*xs: Tensor) -> list[Tensor]:
    """Cast all to one floating dtype: at least float32, float64 if any input is."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _side(n: int, what: str) -> int:
    """Side of the square grid holding `n` tokens; ValueError if `n` is not a square."""
    g = math.isqrt(n)
    if n < 1 or g * g != n:
        raise ValueError(f"{what}: {n} tokens do not form a square grid")
    return g


def label_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the labels.

    logits (B, K), labels (B,) class indices (or (B, K) probabilities, e.g. mixup targets).
    loss = -(1/B) sum_b log softmax(logits_b)[labels_b]          (reduction: mean over batch)
    """
    (logits,) = _upcast(logits)
    if labels.is_floating_point():
        (labels,) = _upcast(labels)
    return F.cross_entropy(logits, labels)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target loss.

    student_logits, teacher_logits (B, K); p_t = softmax(t / T), p_s = softmax(s / T).
    loss = T^2 * (1/B) sum_b sum_k p_t[b,k] * (log p_t[b,k] - log p_s[b,k])
    (KL(p_t || p_s) summed over classes, mean over the batch: "batchmean"). The T^2 keeps the
    gradient's scale independent of T; for large T, loss -> (1/2K) sum_k (d_k - mean d)^2,
    averaged over the batch, with d = t - s.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"soft_kl: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"soft_kl: temperature must be > 0, got {temperature}")
    s, t = _upcast(student_logits, teacher_logits)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (temperature * temperature)


def hard_distill(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT hard-label distillation: cross-entropy with the teacher's argmax.

    loss = -(1/B) sum_b log softmax(s_b)[argmax_k t_b]           (reduction: mean over batch)
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"hard_distill: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    return label_ce(student_logits, teacher_logits.argmax(dim=-1))


def feature_mse(student_tokens: Tensor, teacher_features: Tensor, projector: nn.Module) -> Tensor:
    """MSE between the projected student patch tokens and the teacher's features.

    student_tokens (B, N, Ds): the student's final patch tokens, prefix tokens removed, on a
    g x g grid (N = g^2, row-major). teacher_features: a CNN map (B, Dt, h, w), or ViT patch
    tokens (B, M, Dt) on an m x m grid (prefix removed), read as the map (B, Dt, m, m).
    projector: maps the last dim Ds -> Dt (an `nn.Linear(Ds, Dt)` trained with the student).

    S = projector(student_tokens) reshaped to (B, Dt, g, g), bilinearly resized to (h, w)
    (align_corners=False, no antialias) when (g, g) != (h, w); F the teacher map.
    loss = (1 / (B Dt h w)) sum (S - F)^2                         (reduction: mean over all elements)
    """
    if student_tokens.dim() != 3:
        raise ValueError(f"feature_mse: student_tokens must be (B, N, Ds), got {tuple(student_tokens.shape)}")
    b, n, _ = student_tokens.shape
    g = _side(n, "feature_mse student_tokens")
    if teacher_features.dim() == 3:
        m = _side(teacher_features.shape[1], "feature_mse teacher tokens")
        teacher_map = teacher_features.transpose(1, 2).reshape(b, teacher_features.shape[2], m, m)
    elif teacher_features.dim() == 4:
        teacher_map = teacher_features
    else:
        raise ValueError(
            f"feature_mse: teacher_features must be (B, Dt, h, w) or (B, M, Dt), got {tuple(teacher_features.shape)}"
        )
    proj = projector(student_tokens)
    dt = teacher_map.shape[1]
    if proj.shape[-1] != dt or teacher_map.shape[0] != b:
        raise ValueError(
            f"feature_mse: projected student {tuple(proj.shape)} does not match teacher map {tuple(teacher_map.shape)}"
        )
    student_map = proj.transpose(1, 2).reshape(b, dt, g, g)
    h, w = teacher_map.shape[-2:]
    if (g, g) != (h, w):
        student_map = F.interpolate(student_map, size=(h, w), mode="bilinear", align_corners=False)
    student_map, teacher_map = _upcast(student_map, teacher_map)
    return F.mse_loss(student_map, teacher_map)


def _patch_attention(attn: Tensor, prefix: int, what: str) -> tuple[Tensor, int]:
    """(B, H, T, T) -> head-mean patch-to-patch attention (B, N, N) and the grid side."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention_kl: {what} attention must be (B, H, T, T), got {tuple(attn.shape)}")
    if not 0 <= prefix < attn.shape[-1]:
        raise ValueError(f"attention_kl: {what} prefix {prefix} out of range for {attn.shape[-1]} tokens")
    (attn,) = _upcast(attn)
    a = attn.mean(dim=1)[:, prefix:, prefix:]
    return a, _side(a.shape[-1], f"attention_kl {what} patch")


def _resize_rows(a: Tensor, g: int, size: int) -> Tensor:
    """(B, R, g*g) -> (B, R, size*size): each row read as a g x g map, bilinearly resized."""
    b, r, _ = a.shape
    x = a.reshape(b * r, 1, g, g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(b, r, size * size)


def _normalize_rows(a: Tensor) -> Tensor:
    a = a.clamp_min(ATTN_EPS)
    return a / a.sum(dim=-1, keepdim=True)


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, student_prefix: int, teacher_prefix: int) -> Tensor:
    """KL between the teacher's and the student's last-block patch-to-patch attention.

    student_attn (B, Hs, Ts, Ts), teacher_attn (B, Ht, Tt, Tt): softmax probabilities; the
    head counts may differ. Each is averaged over heads, its first `prefix` tokens (cls,
    distillation token) dropped on both the query and the key axis, leaving A (B, N, N) on a
    square grid. When the grids differ, the student's map is resized to the teacher's on the
    key axis (each row as a g x g map) and then on the query axis (each column likewise),
    bilinear with align_corners=False. Then both maps (the teacher's too, since dropping the
    prefix keys leaves rows summing to < 1) get each row clamped to >= ATTN_EPS and divided by
    its sum, giving P_t and P_s.
    loss = (1 / (B N)) sum_{b,q} sum_k P_t[b,q,k] (log P_t[b,q,k] - log P_s[b,q,k])
    (KL summed over keys, mean over batch and query rows; N = the teacher's patch count).
    """
    s, gs = _patch_attention(student_attn, student_prefix, "student")
    t, gt = _patch_attention(teacher_attn, teacher_prefix, "teacher")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"attention_kl: batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
    s, t = _upcast(s, t)
    if gs != gt:
        s = _resize_rows(s, gs, gt)  # key axis: (B, Ns, Nt)
        s = _resize_rows(s.transpose(1, 2), gs, gt).transpose(1, 2)  # query axis: (B, Nt, Nt)
    log_ps = _normalize_rows(s).log()
    log_pt = _normalize_rows(t).log()
    kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)  # (B, N)
    return kl_rows.mean()


def _require(value: Tensor | None, name: str, term: str, why: str) -> Tensor:
    if value is None:
        raise ValueError(f"the {term} term ({why}) needs {name}, got None")
    return value


class DistillLoss(nn.Module):
    """The recipe's weighted sum of the losses above; holds the feature projector when needed.

    `DistillLoss(recipe, student_dim, teacher_dim)`: `projector = nn.Linear(student_dim,
    teacher_dim)` exists only when `recipe.feature_weight > 0` (both dims are then required);
    it is a parameter of this module, so put `DistillLoss.parameters()` in the optimizer.

    `forward(student, labels, teacher) -> (total, parts)`: the student's and the teacher's
    outputs as the models return them; total is the 0-dim loss to backpropagate; parts maps
    each computed term ("label", "soft", "hard", "feature", "attention") to its unweighted
    value and "total" to the total, as Python floats (one device sync per call). Teacher
    inputs are detached. A term with weight 0 is skipped, and its inputs may be None; a term
    with a non-zero weight and a None input raises ValueError naming it. Half-precision
    inputs (bf16 autocast) are upcast to float32 by each term.
    """

    projector: nn.Linear | None

    def __init__(self, recipe: RecipeSpec, student_dim: int | None = None, teacher_dim: int | None = None):
        super().__init__()
        problems = recipe.problems()
        if problems:
            raise ValueError(problems[0])
        self.recipe = recipe
        if recipe.feature_weight > 0:
            if student_dim is None or teacher_dim is None:
                raise ValueError("recipe.feature_weight > 0 needs student_dim and teacher_dim to build the projector")
            self.projector = nn.Linear(student_dim, teacher_dim)
        else:
            self.projector = None

    @property
    def needs_features(self) -> bool:
        """Whether `forward` needs the student's tokens and the teacher's features."""
        return self.recipe.needs_features

    @property
    def needs_attention(self) -> bool:
        """Whether `forward` needs both models' attention maps."""
        return self.recipe.needs_attention

    def forward(self, student: Any, labels: Tensor | None, teacher: Any = None) -> tuple[Tensor, dict[str, float]]:
        """The recipe's loss for one batch.

        student: a `kdsearch.models.student.StudentOutput` (logits, dist_logits, tokens with the
        prefix first, attn, num_prefix_tokens); teacher: a `kdsearch.train.teacher.TeacherOutput`
        (logits, features, attn, num_prefix_tokens), or None when the recipe uses no teacher.
        """
        r = self.recipe
        kd = student.dist_logits if student.dist_logits is not None else student.logits
        t_logits = getattr(teacher, "logits", None)
        terms: dict[str, tuple[float, Tensor]] = {}
        if r.alpha < 1:
            y = _require(labels, "labels", "label", f"recipe.alpha = {r.alpha} < 1")
            terms["label"] = (1.0 - r.alpha, label_ce(student.logits, y))
        if r.alpha > 0:
            t = _require(t_logits, "teacher_logits", "soft", f"recipe.alpha = {r.alpha} > 0")
            terms["soft"] = (r.alpha, soft_kl(kd, t.detach(), r.temperature))
        if r.hard_weight > 0:
            t = _require(t_logits, "teacher_logits", "hard", f"recipe.hard_weight = {r.hard_weight} > 0")
            terms["hard"] = (r.hard_weight, hard_distill(kd, t.detach()))
        if r.feature_weight > 0:
            why = f"recipe.feature_weight = {r.feature_weight} > 0"
            st = _require(student.tokens, "student_tokens", "feature", why)[:, student.num_prefix_tokens :]
            tf = _require(getattr(teacher, "features", None), "teacher_features", "feature", why)
            assert self.projector is not None
            terms["feature"] = (r.feature_weight, feature_mse(st, tf.detach(), self.projector))
        if r.attention_weight > 0:
            why = f"recipe.attention_weight = {r.attention_weight} > 0"
            sa = _require(student.attn, "student_attn", "attention", why)
            ta = _require(getattr(teacher, "attn", None), "teacher_attn", "attention", why)
            attn = attention_kl(sa, ta.detach(), student.num_prefix_tokens, teacher.num_prefix_tokens)
            terms["attention"] = (r.attention_weight, attn)

        total: Tensor | None = None
        for weight, value in terms.values():
            total = weight * value if total is None else total + weight * value
        assert total is not None  # alpha in [0, 1] always leaves label or soft
        values = [v.detach().to(total.dtype) for _, v in terms.values()] + [total.detach()]
        parts = dict(zip(list(terms) + ["total"], torch.stack(values).tolist()))
        return total, parts
