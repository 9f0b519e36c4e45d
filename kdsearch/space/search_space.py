"""A validated search space and the `TrialSpec`s it makes.

`kdsearch.space.file` reads a YAML file into a `SearchSpace` (all validation happens there);
this module is the model: the dimensions, the fixed data and teacher, the objectives, the
budgets, the resources and the search settings, and the ways to make trial specs from them.
Each key of the `budget`, `resources`, `early_stopping` and `search` sections is a `setting`
field of its dataclass here: its type, default and allowed values, stated once.

`SearchSpace.suggest(trial)` is define-by-run: it only calls `trial.suggest_*` (and
`trial.set_constraint` for the budgets), so Optuna's samplers, Ray Tune's OptunaSearch and
`optuna.trial.FixedTrial` all drive it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdsearch.errors import SpaceError
from kdsearch.space import objectives as objective_table
from kdsearch.space.datasets import DATASETS
from kdsearch.space.dimensions import Dimension, Fixed, SuggestTrial, cardinality
from kdsearch.space.flops import count_flops
from kdsearch.space.samplers import SAMPLERS
from kdsearch.space.specs import (
    SEED_MAX,
    DataSpec,
    RecipeSpec,
    StudentSpec,
    TeacherSource,
    TeacherSpec,
    TrainSpec,
    TrialSpec,
    setting,
    teacher_source,
)


@dataclass(frozen=True)
class Budget:
    """Limits a config must meet before it may train; None means no limit."""

    max_gflops: float | None = setting(None, "a number of GFLOPs > 0, or null", lambda v: v > 0)
    max_params: int | None = setting(None, "a parameter count > 0, or null", lambda v: v > 0)

    def violations(self, student: StudentSpec) -> dict[str, float]:
        """Optuna-style constraint values: feasible when every value is <= 0 (relative excess)."""
        fc = count_flops(student)
        out = {}
        if self.max_gflops is not None:
            out["max_gflops"] = fc.flops / (self.max_gflops * 1e9) - 1.0
        if self.max_params is not None:
            out["max_params"] = fc.params / self.max_params - 1.0
        return out

    def feasible(self, student: StudentSpec) -> bool:
        return all(v <= 0 for v in self.violations(student).values())

    def limit(self, objective: str) -> float | None:
        """The most of `objective` a trial may have ("flops" in FLOPs, "params"), None when unlimited."""
        if objective == "flops" and self.max_gflops is not None:
            return self.max_gflops * 1e9
        if objective == "params" and self.max_params is not None:
            return float(self.max_params)
        return None


@dataclass(frozen=True)
class Resources:
    """What one trial asks of Ray."""

    cpus: float = setting(1.0, "a number > 0", lambda v: v > 0)
    gpus: float = setting(0.0, "a number >= 0 (fractions share a GPU)", lambda v: v >= 0)


@dataclass(frozen=True)
class EarlyStopping:
    """The space's `early_stopping` section: kdsearch.search.early_stopping's rule reads it."""

    enabled: bool = setting(True)
    grace_epochs: int = setting(5, "an integer >= 1", lambda v: v >= 1)
    reduction_factor: int = setting(2, "an integer >= 2", lambda v: v >= 2)
    beaten_by: int = setting(2, "an integer >= 1", lambda v: v >= 1)


TRACKERS = ("mlflow", "wandb", "tensorboard")
"""The experiment trackers `search.track` and `--track` name (each an optional extra: kdsearch[NAME])."""

STRATEGIES = ("standard", "oneshot")
"""`search.strategy`: train every trial from scratch, or screen the students with a supernet first."""


@dataclass(frozen=True)
class SearchSettings:
    """The space's `search` section: how many trials, chosen by which sampler, run how."""

    trials: int = setting(16, "an integer >= 1", lambda v: v >= 1)
    population_size: int | None = setting(None, "an integer >= 2 (NSGA-II), or null", lambda v: v >= 2)
    sampler: str = setting("nsga2", "one of " + ", ".join(SAMPLERS), lambda v: v in SAMPLERS)
    seed: int = setting(
        0, f"an integer from 0 to {SEED_MAX} (2**{SEED_MAX.bit_length()} - 1)", lambda v: 0 <= v <= SEED_MAX
    )
    max_failures: int = setting(1, "an integer >= 0", lambda v: v >= 0)
    # a trial checkpoints every this many epochs (0: never); a retry continues from it
    checkpoint_every: int = setting(
        1, "an integer >= 0 (epochs between a trial's checkpoints; 0: none)", lambda v: v >= 0
    )
    max_concurrent: int | None = setting(None, "an integer >= 1, or null", lambda v: v >= 1)
    # configs tried first (dotted dimension names -> values); the space file's parser checks them
    enqueue: tuple[dict[str, Any], ...] = ()
    # the experiment trackers each trial is logged to (kdsearch.search.trackers); the file gives a list or one name
    track: tuple[str, ...] = setting(
        (), "a list of trackers: " + ", ".join(TRACKERS), lambda v: all(name in TRACKERS for name in v)
    )
    # standard: every trial trains from scratch; oneshot: a supernet screens the students first (kdsearch.search.oneshot)
    strategy: str = setting("standard", "one of " + ", ".join(STRATEGIES), lambda v: v in STRATEGIES)
    supernet_epochs: int | None = setting(
        None, "an integer >= 1, or null (the space's train.epochs default)", lambda v: v >= 1
    )
    screen_subnets: int = setting(1000, "an integer >= 1 (students the screening scores)", lambda v: v >= 1)
    screen_sampler: str = setting("nsga2", "one of " + ", ".join(SAMPLERS), lambda v: v in SAMPLERS)


@dataclass(frozen=True)
class SearchSpace:
    """A validated space. `dims` maps dotted names (`student.depth`) to their dimension;
    `objectives` are (name, "max" | "min") pairs of names in kdsearch.space.objectives' table."""

    name: str
    source: str
    dims: dict[str, Dimension]
    data: DataSpec
    teacher: TeacherSpec
    objectives: tuple[tuple[str, str], ...]
    budget: Budget
    resources: Resources
    search: SearchSettings
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    description: str = ""
    reference: dict[str, float] = field(default_factory=dict)  # hypervolume.reference as the file states it
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- making TrialSpecs -----------------------------------------------------------

    def suggest(self, trial: SuggestTrial) -> TrialSpec:
        """Define-by-run: suggest every searched dimension, then tell the trial the budgets."""
        spec = self.build({name: dim.suggest(trial, name) for name, dim in self.dims.items()})
        set_constraint = getattr(trial, "set_constraint", None)
        if set_constraint is not None:
            for key, value in self.budget.violations(spec.student).items():
                set_constraint(key, value)
        return spec

    def default_spec(self, overrides: Mapping[str, Any] | None = None) -> TrialSpec:
        """Each dimension at its `default` (else first choice / middle of range), then `overrides`
        (already checked: `kdsearch.space.file.parse_sets`)."""
        values = {name: dim.default for name, dim in self.dims.items()}
        values.update(overrides or {})
        spec = self.build(values)
        problems = spec.student.problems()
        if problems:
            raise SpaceError(self.source, "--set", f"the student cannot be built: {problems[0]}")
        return spec

    def sample(self, rng: np.random.Generator) -> TrialSpec:
        """A uniformly random config (for summaries; searches sample through Optuna)."""
        return self.build({name: dim.sample(rng) for name, dim in self.dims.items()})

    def build(self, values: Mapping[str, Any]) -> TrialSpec:
        """The TrialSpec for one value per dimension (dotted names as in `dims`)."""
        sections: dict[str, dict[str, Any]] = {"student": {}, "recipe": {}, "train": {}}
        for key, value in values.items():
            section, _, name = key.partition(".")
            sections[section][name] = value
        st = sections["student"]
        if "head_dim" in st:
            st["embed_dim"] = st.pop("head_dim") * st["num_heads"]
        student = StudentSpec(
            img_size=self.data.img_size,
            in_chans=DATASETS[self.data.name].in_chans,
            num_classes=self.data.num_classes or 0,
            **st,
        )
        return TrialSpec(
            student=student,
            recipe=RecipeSpec(**sections["recipe"]),
            train=TrainSpec(**sections["train"]),
            data=self.data,
            teacher=self.teacher,
        )

    # ---- looking at the space --------------------------------------------------------

    def student_dims(self) -> dict[str, Dimension]:
        return {k: d for k, d in self.dims.items() if k.startswith("student.")}

    def num_architectures(self) -> float:
        """Distinct students the space holds (inf when a student dimension is continuous)."""
        return math.prod(cardinality(d) for d in self.student_dims().values())

    def architectures(self, dims: Mapping[str, Dimension] | None = None) -> Iterator[StudentSpec]:
        """Every student (float ranges at their two ends: FLOPs and params are monotone in them);
        `dims` replaces the student dimensions (kept by `largest`)."""
        dims = self.student_dims() if dims is None else dims
        recipe_train = {k: d.default for k, d in self.dims.items() if not k.startswith("student.")}
        for combo in itertools.product(*(d.values() for d in dims.values())):
            yield self.build({**recipe_train, **dict(zip(dims, combo))}).student

    # ---- the hypervolume's reference point -------------------------------------------

    def reference_point(self, objectives: Sequence[tuple[str, str]] | None = None) -> dict[str, float]:
        """The hypervolume's reference, fixed by the space (so runs of one space compare), for
        `objectives` (default: the space's); an objective with none is left out.

        Each objective's reference is, first found: the value the file states under
        `hypervolume.reference`; for a maximized one, its worst (`Objective.worst`: val_acc 0);
        for a minimized one, its budget (flops: max_gflops x 1e9, params: max_params), else its
        largest value over the space's students (`largest`). A measured objective with no
        budget (a latency) has none unless the file states it.
        """
        out = {}
        for name, mode in self.objectives if objectives is None else objectives:
            if name in self.reference:
                out[name] = float(self.reference[name])
            elif mode == "max":
                worst = objective_table.get(name).worst
                if worst is not None and objective_table.get(name).mode == "max":
                    out[name] = float(worst)
            elif (limit := self.budget.limit(name)) is not None:
                out[name] = limit
            elif (most := self.largest(name)) is not None:
                out[name] = most
        return out

    def largest(self, name: str) -> float | None:
        """The exact largest value of a computed objective over the space's students; None for an
        objective that is not computed, or one outside GROWS_WITH_SIZE whose space holds more
        than MAX_ENUMERATED students.

        Exact without trying every student: FLOPs, MACs and params (kdsearch.space.flops) are
        sums of products of depth, embed_dim and the MLP width with non-negative factors, the
        other fields fixed, so none of them shrinks when depth, the width (embed_dim, or head_dim
        at a fixed num_heads) or mlp_ratio grows; those dimensions are taken at their largest
        value and only the others (patch size, heads, encoding, distillation token) are tried
        in every combination. tests/test_pareto.py holds this to trying every student. Any other
        computed objective is tried on every student (a float range at its two ends).
        """
        objective = objective_table.get(name)
        if objective.compute is None:
            return None
        dims = self.student_dims()
        if name in GROWS_WITH_SIZE:
            dims = {k: Fixed(max(d.values())) if k in SIZE_DIMS else d for k, d in dims.items()}
        elif math.prod(len(d.values()) for d in dims.values()) > MAX_ENUMERATED:
            return None
        return float(max(objective.compute(student) for student in self.architectures(dims)))

    def teacher_sources(self) -> set[TeacherSource]:
        """Where the teacher signal comes from, over every recipe the space holds.

        `teacher_source` depends on each weight only through whether it is 0, so one recipe per
        zero/non-zero pattern of the recipe dimensions covers the space.
        """
        recipe_dims = {k.removeprefix("recipe."): d for k, d in self.dims.items() if k.startswith("recipe.")}
        patterns = [sorted({0.0 if v == 0 else max(d.values()) for v in d.values()}) for d in recipe_dims.values()]
        return {teacher_source(RecipeSpec(**dict(zip(recipe_dims, combo)))) for combo in itertools.product(*patterns)}


MAX_ENUMERATED = 200_000
# computed objectives that never shrink when a SIZE_DIMS dimension grows (SearchSpace.largest says why)
GROWS_WITH_SIZE = ("flops", "macs", "params")
SIZE_DIMS = ("student.depth", "student.embed_dim", "student.head_dim", "student.mlp_ratio")


def iter_architectures(space: SearchSpace) -> Iterator[StudentSpec]:
    """All architectures when there are at most MAX_ENUMERATED, else a seeded random sample."""
    finite = math.prod(len(d.values()) for d in space.student_dims().values())
    if finite <= MAX_ENUMERATED:
        yield from space.architectures()
        return
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        yield space.sample(rng).student


def check_strategy(space: SearchSpace) -> None:
    """The cross-key rule of `search.strategy: oneshot`: a supernet's subnets are scored before
    any trains, so each objective is val_acc (inherited) or computed from the spec.

    Raises:
        SpaceError: an objective of the space is measured (latency_ms, ...) or reported otherwise.
    """
    if space.search.strategy != "oneshot":
        return
    for name, _ in space.objectives:
        if name != "val_acc" and objective_table.get(name).source != "computed":
            computed = ", ".join(objective_table.names("computed"))
            raise SpaceError(
                space.source,
                "search.strategy",
                f"oneshot screens students before any trains, so its objectives are val_acc and those computed "
                f"from the spec ({computed}); {name} is {objective_table.get(name).source}: drop it or use strategy standard",
            )
