"""The frozen specs a trial is made of, and their round trip through a flat dict.

A `TrialSpec` is everything one trial needs: the student architecture, the distillation
recipe, the training settings, and (fixed per search) the data and teacher it distils from.
`TrialSpec.to_dict()` is flat with dotted keys (`student.depth`, `recipe.alpha`), so the same
dict is a Ray Tune config, a row of Parquet columns and a `--set` target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from kdsearch.space.datasets import DATASETS
from kdsearch.space.encodings import ENCODINGS

POS_EMBEDS: tuple[str, ...] = tuple(ENCODINGS)
"""Positional encodings a student can use: the names of kdsearch.space.encodings' table."""


def setting(
    default: Any, allowed: str = "", check: Callable[[Any], bool] | None = None, *, optional: bool = False
) -> Any:
    """A field a space file may set: the one statement of its key's schema.

    The space file's schema (kdsearch.space.schema) is read from these fields: the key's type
    is the field's annotation, and null is allowed where the annotation is `X | None` or
    `optional` is set.

    Args:
        default: The value a space file that leaves the key out gets (None where `optional`).
        allowed: The values the key may take, in the words of the space file's errors
            ("an integer >= 1"); empty for a bool.
        check: True for an allowed value of the key's type; None: every value of the type.
        optional: Null is allowed although the type is not `X | None`: the space file then
            leaves the value to the data (`data.img_size`: the dataset's image size).

    Returns:
        A dataclass field.
    """
    return field(default=default, metadata={"allowed": allowed, "check": check, "optional": optional})


def searchable(default: Any, allowed: str = "", check: Callable[[Any], bool] | None = None) -> Any:
    """A `setting` of `student`, `recipe` or `train`, which a space file may fix or search
    (a choice list or a range of values each `check` allows)."""
    return setting(default, allowed, check)


def _int_at_least(n: int) -> dict[str, Any]:
    return {"allowed": f"an integer >= {n}", "check": lambda v: v >= n}


_POSITIVE = {"allowed": "a number > 0", "check": lambda v: v > 0}
_NON_NEGATIVE = {"allowed": "a number >= 0", "check": lambda v: v >= 0}
_FRACTION = {"allowed": "a number strictly between 0 and 1", "check": lambda v: 0 < v < 1}
_NO_NUL = {"check": lambda v: "\0" not in v}  # a path the OS can open
_NAME = {"check": lambda v: bool(v.strip())}  # a dataset's column or split

SEED_MAX = 2**32 - 1
"""Seeds run from 0 to SEED_MAX (2**32 - 1): Optuna's samplers and NumPy take no other; every
seed a space allows (`train.seed`, `search.seed`) and every seed derived from them is in range."""


class Problem(str):
    """One reason a student cannot be built, as text ("patch_size 5 does not divide ..."),
    with the `field` it is about and the `detail` after the field's name."""

    field: str
    detail: str

    def __new__(cls, field: str, detail: str) -> Problem:
        p = super().__new__(cls, f"{field} {detail}")
        p.field, p.detail = field, detail
        return p

    def __getnewargs__(self) -> tuple[str, str]:
        return (self.field, self.detail)


@dataclass(frozen=True)
class StudentSpec:
    """A ViT student. `embed_dim` is always divisible by `num_heads` (the space guarantees it)."""

    img_size: int = 16  # these three come from the data
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = searchable(4, **_int_at_least(1))
    embed_dim: int = searchable(64, **_int_at_least(1))
    depth: int = searchable(4, **_int_at_least(1))
    num_heads: int = searchable(4, **_int_at_least(1))
    mlp_ratio: float = searchable(2.0, **_POSITIVE)
    pos_embed: str = searchable("learned", "one of " + ", ".join(POS_EMBEDS), lambda v: v in POS_EMBEDS)
    distill_token: bool = searchable(False)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Class token, plus DeiT's distillation token when present."""
        return 1 + int(self.distill_token)

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width, rounded down as timm's Block does (`int(dim * mlp_ratio)`)."""
        return int(self.embed_dim * self.mlp_ratio)

    def problems(self) -> list[Problem]:
        """Reasons this architecture cannot be built; empty when it can.

        The one statement of the rules: the space file's validation applies it to every
        combination a space holds, `build_student` and `count_flops` to one spec.
        """
        out = []
        if self.pos_embed not in POS_EMBEDS:
            out.append(Problem("pos_embed", f"{self.pos_embed!r} is not one of {', '.join(POS_EMBEDS)}"))
        for name in ("img_size", "in_chans", "num_classes", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                out.append(Problem(name, f"must be >= 1, got {getattr(self, name)}"))
        # widths stay within int64 (the run's columns), so every count of FLOPs and params fits a float
        if self.embed_dim >= 2**63:
            out.append(Problem("embed_dim", f"{self.embed_dim:.3g} is 2**63 or more"))
        elif self.embed_dim * self.mlp_ratio >= 2**63:
            out.append(Problem("mlp_ratio", f"{self.mlp_ratio:g} x embed_dim {self.embed_dim} is 2**63 or more"))
        if out:
            return out
        if self.img_size % self.patch_size:
            out.append(Problem("patch_size", f"{self.patch_size} does not divide the image size {self.img_size}"))
        if self.embed_dim % self.num_heads:
            out.append(Problem("embed_dim", f"{self.embed_dim} is not divisible by num_heads {self.num_heads}"))
        width_problem = ENCODINGS[self.pos_embed].width_problem(self.embed_dim, self.num_heads)
        if width_problem:
            out.append(Problem("pos_embed", width_problem))
        if self.mlp_hidden < 1:
            out.append(Problem("mlp_ratio", f"{self.mlp_ratio} x embed_dim {self.embed_dim} leaves an empty MLP"))
        return out


@dataclass(frozen=True)
class RecipeSpec:
    """Distillation-loss weights; see `kdsearch.train.distill` for each term's formula.

    total = (1 - alpha) * CE(student, labels)
            + alpha * T^2 * KL(teacher_T || student_T)            (Hinton soft KL)
            + hard_weight * CE(student, argmax teacher)           (DeiT hard distillation)
            + feature_weight * MSE(proj(student tokens), teacher features)
            + attention_weight * KL(teacher attention || student attention)
    With a distillation token the teacher terms train the token's head and the label term
    the class head (DeiT). A weight of 0 removes its term and its cost.
    """

    alpha: float = searchable(0.5, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    temperature: float = searchable(4.0, **_POSITIVE)
    hard_weight: float = searchable(0.0, **_NON_NEGATIVE)
    feature_weight: float = searchable(0.0, **_NON_NEGATIVE)
    attention_weight: float = searchable(0.0, **_NON_NEGATIVE)

    def problems(self) -> list[str]:
        """Weights outside what each allows (the space file refuses them too); empty when none."""
        return out_of_range(self, "recipe")

    @property
    def uses_teacher_logits(self) -> bool:
        """Soft KL or hard-label distillation: the teacher's logits, cacheable once per search."""
        return self.alpha > 0 or self.hard_weight > 0

    @property
    def needs_features(self) -> bool:
        """Feature distillation: the teacher's final features and the student's patch tokens."""
        return self.feature_weight > 0

    @property
    def needs_attention(self) -> bool:
        """Attention distillation: both models' last attention maps."""
        return self.attention_weight > 0

    @property
    def needs_live_teacher(self) -> bool:
        """Feature or attention distillation: the teacher's insides, so it runs on every batch."""
        return self.needs_features or self.needs_attention


class TeacherSource(str, Enum):
    """Where a trial's teacher signal comes from."""

    NONE = "none"  # plain cross-entropy with the labels: no teacher at all
    CACHED = "cached"  # computed once per search: the logit cache, or the replay cache under augmentation
    LIVE = "live"  # the teacher runs on every batch


def teacher_source(recipe: RecipeSpec, live: bool = False) -> TeacherSource:
    """The one rule for where a recipe's teacher signal comes from.

    Feature or attention distillation needs the teacher's inner activations: live. Soft or
    hard distillation needs only its logits: cached once per search (with a random
    augmentation, per image and epoch with the view's seed), unless `live` forces it (a baseline).
    """
    if recipe.needs_live_teacher:
        return TeacherSource.LIVE
    if not recipe.uses_teacher_logits:
        return TeacherSource.NONE
    return TeacherSource.LIVE if live else TeacherSource.CACHED


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = searchable(10, **_int_at_least(1))
    batch_size: int = searchable(64, **_int_at_least(1))
    lr: float = searchable(1e-3, **_POSITIVE)
    weight_decay: float = searchable(0.05, **_NON_NEGATIVE)
    warmup_epochs: int = searchable(1, **_int_at_least(0))
    seed: int = searchable(0, f"an integer from 0 to 2**{SEED_MAX.bit_length()} - 1", lambda v: 0 <= v <= SEED_MAX)
    compile: bool = searchable(False)  # torch.compile the training step (worth it on GPUs, for long trials)
    # an attempt that trains longer fails with TrialTimedOut at the next batch boundary (None: no limit)
    max_minutes: float | None = searchable(None, "a number of minutes > 0, or null", lambda v: v > 0)


def out_of_range(spec: Any, section: str) -> list[str]:
    """`section.name must be ALLOWED, got VALUE` for each searchable field outside what it allows."""
    return [
        f"{section}.{f.name} must be {f.metadata['allowed']}, got {getattr(spec, f.name)!r}"
        for f in fields(spec)
        if f.metadata.get("check") is not None and not f.metadata["check"](getattr(spec, f.name))
    ]


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from. `root` is absolute once a space is loaded; None for digits, and
    for a dataset with a public archive (CIFAR) the per-user cache it is fetched into
    (kdsearch.train.fetch.default_data_root)."""

    name: str = setting("digits", "one of " + ", ".join(DATASETS), lambda v: v in DATASETS)
    img_size: int = setting(16, **_int_at_least(1), optional=True)  # null in a space file: the dataset's size
    root: str | None = setting(None, "a folder's path (CIFAR: null for the per-user cache)", **_NO_NUL)
    num_classes: int | None = setting(None, **_int_at_least(2))
    val_fraction: float = setting(0.2, **_FRACTION)  # of the training data, carved out (stratified, fixed) to select on
    augment: bool = setting(False)
    # of all images, held out as the test split where the dataset has none (digits)
    test_fraction: float = setting(0.2, **_FRACTION)
    # hf only (kdsearch.train.hf_data): the dataset, and its columns and splits (null: found)
    path: str | None = setting(None, "a hub id, a folder written by save_to_disk, or Parquet files", **_NO_NUL)
    image_column: str | None = setting(None, "a column's name", **_NAME)
    label_column: str | None = setting(None, "a column's name", **_NAME)
    train_split: str | None = setting(None, "a split's name", **_NAME)
    test_split: str | None = setting(None, "a split's name", **_NAME)


BUILTIN_TEACHER = "kdsearch/digits_cnn"
"""The teacher kdsearch trains itself (kdsearch.models.digits_cnn), for the embedded digits."""

SPARSE_ABOVE = 100
"""Above this many classes the teacher caches keep each image's top-k logits only (TinyViT)."""


@dataclass(frozen=True)
class TeacherSpec:
    """A timm model name (or `kdsearch/digits_cnn`) plus where its weights come from: the
    checkpoint when it is given (`kdsearch teacher finetune` writes it from the pretrained
    weights when `pretrained` is set too), else timm's pretrained weights as they are."""

    model: str = setting(BUILTIN_TEACHER, f"a timm model name or {BUILTIN_TEACHER}", lambda v: bool(v.strip()))
    checkpoint: str | None = setting(None, "a file's path", **_NO_NUL)
    pretrained: bool = setting(False)
    # the pretrained weights as a local file, read through timm's pretrained config in place of the hub
    pretrained_file: str | None = setting(None, "a file's path (with pretrained: true)", **_NO_NUL)
    cache_topk: int = setting(
        10, f"an integer >= 1 (logits kept per image above {SPARSE_ABOVE} classes)", lambda v: v >= 1
    )


def logit_bytes_per_image(num_classes: int, topk: int) -> int:
    """What one training image costs in the plain logit cache: float32 logits, dense or k
    (value, int32 index) pairs above SPARSE_ABOVE classes."""
    return topk * (4 + 4) if num_classes > SPARSE_ABOVE else 4 * num_classes


def replay_bytes_per_view(num_classes: int, topk: int) -> int:
    """What one (image, epoch) costs in the replay cache: a 4-byte seed and the logits, dense
    fp16 for few classes or k (fp16 value, int16 index) pairs above SPARSE_ABOVE."""
    return 4 + (topk * (2 + 2) if num_classes > SPARSE_ABOVE else 2 * num_classes)


@dataclass(frozen=True)
class TrialSpec:
    student: StudentSpec = field(default_factory=StudentSpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict with dotted keys: `{"student.depth": 4, "recipe.alpha": 0.5, ...}`."""
        out: dict[str, Any] = {}
        for section in fields(self):
            for f in fields(getattr(self, section.name)):
                out[f"{section.name}.{f.name}"] = getattr(getattr(self, section.name), f.name)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialSpec:
        """Inverse of `to_dict`. Unknown keys raise KeyError; missing keys take the defaults.

        Values are coerced to the field's type (Parquet and JSON may hand back numpy
        scalars or ints for floats), so `from_dict(to_dict(s)) == s` for any spec.
        """
        grouped: dict[str, dict[str, Any]] = {f.name: {} for f in fields(cls)}
        section_types = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        for key, value in d.items():
            section, _, name = key.partition(".")
            if section not in grouped:
                raise KeyError(f"unknown section in {key!r}")
            ftypes = {f.name: f.type for f in fields(section_types[section]())}
            if name not in ftypes:
                raise KeyError(f"unknown field {key!r}")
            grouped[section][name] = _coerce(value, ftypes[name])
        return cls(**{s: section_types[s]().__class__(**kw) for s, kw in grouped.items()})


def _coerce(value: Any, type_name: Any) -> Any:
    """Turn numpy scalars and JSON numbers into the dataclass field's own Python type."""
    if value is None:
        return None
    t = str(type_name)
    if hasattr(value, "item"):
        value = value.item()
    if t.startswith("bool"):
        return bool(value)
    if t.startswith("int"):
        return int(value)
    if t.startswith("float"):
        return float(value)
    if t.startswith("str"):
        return str(value)
    return value
