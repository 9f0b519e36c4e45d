"""The objectives a search can optimize: one table that every other part reads.

Each `Objective` says its name, its default direction, its unit, how it is obtained and how
it is shown. It is obtained in one of three ways:

    computed  `compute(student_spec)`: exact, from the spec alone, before anything trains
              (FLOPs, MACs, params: kdsearch.space.flops)
    trained   reported by `run_trial` itself after every epoch (val_acc)
    measured  `measure(ctx)`: called by `run_trial` after every epoch on the model as trained
              so far (for a latency or memory objective, or one of a user's own)

The space file names objectives from this table (`objectives: {val_acc: max, flops: min}`);
the trial reports them, the recorder writes them to trials.parquet and epochs.parquet, and
the front, `status`, the pictures, the report and the export show them, all by reading this
table. Adding one is one `register` call (and its function): see ARCHITECTURE.md.

Torch-free: `compute` and `measure` are plain callables; a `measure` receives the torch
model inside `MeasureContext` and imports what it needs itself. The built-in measured
objectives ask the context for the training stack's figure (`MeasureContext.figure`: the
trial hands kdsearch.train.measure's function down), so this table names no part above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

MODES = ("max", "min")


@dataclass(frozen=True)
class MeasureContext:
    """What a `measure` function may look at: the model (in eval mode), its spec, the data,
    the device and the epoch just finished (1-based); `figures` is the training stack's
    measuring function (kdsearch.train.measure.measure_objective), which `figure` calls."""

    model: Any
    spec: Any  # TrialSpec
    data: Any  # kdsearch.train.data.Data
    device: Any
    epoch: int
    figures: Callable[[MeasureContext, str], float] | None = None

    def figure(self, name: str) -> float:
        """The training stack's figure `name` (latency_ms, throughput, inference_memory) of this model.

        Raises:
            ValueError: the context was made without `figures`.
        """
        if self.figures is None:
            raise ValueError(f"{name}: this MeasureContext has no figures (kdsearch.train.measure.measure_objective)")
        return self.figures(self, name)


@dataclass(frozen=True)
class Objective:
    """One row of the objectives table."""

    name: str
    mode: str  # the direction a space gets when it names the objective without one
    unit: str  # the unit of the raw value, said in full (JSON, axis labels)
    how: str  # how the value is obtained, in a sentence (space show, the report)
    scale: float = 1.0  # shown divided by this...
    shown_as: str = ""  # ...under this heading (e.g. "MFLOPs"); the name when empty
    fmt: str = ".4g"  # format spec of the shown value
    compute: Callable[[Any], float] | None = None  # StudentSpec -> value, exact, before training
    measure: Callable[[MeasureContext], float] | None = None  # after each epoch
    worst: float | None = None  # told to the sampler for a trial that never trained (infeasible)
    best: float | None = None  # the ideal value (the far corner of the hypervolume's box); None: 0 for a minimized one

    @property
    def source(self) -> str:
        """ "computed", "measured" or "trained"."""
        if self.compute is not None:
            return "computed"
        return "measured" if self.measure is not None else "trained"

    @property
    def heading(self) -> str:
        return self.shown_as or self.name

    def show(self, value: Any) -> str:
        """The value as a table cell: divided by `scale`, formatted with `fmt`; empty when missing."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return format(float(value) / self.scale, self.fmt)

    def axis_label(self) -> str:
        return f"{self.heading} ({self.unit})" if self.unit else self.heading

    def worst_value(self, mode: str) -> float:
        """The value a never-trained trial is told to have: `worst`, else the end of the scale."""
        if self.worst is not None:
            return self.worst
        return -math.inf if mode == "max" else math.inf

    def ideal_value(self, mode: str) -> float | None:
        """The best value there is: `best`, else 0 for a minimized objective (a cost counts
        down to nothing), else None (a maximized objective with no known best)."""
        if self.best is not None:
            return self.best
        return 0.0 if mode == "min" else None


def _flops(student: Any) -> float:
    from kdsearch.space.flops import count_flops

    return count_flops(student).flops


def _macs(student: Any) -> float:
    from kdsearch.space.flops import count_flops

    return count_flops(student).macs


def _params(student: Any) -> float:
    from kdsearch.space.flops import count_flops

    return count_flops(student).params


def _measured(name: str, ctx: MeasureContext) -> float:
    return ctx.figure(name)


# How the measured objectives are taken (kdsearch.train.measure reads these): the images per
# forward for throughput and inference_memory, and (warm-up, timed) forwards on each device
MEASURE_BATCH = 64
MEASURE_REPEATS: dict[str, dict[str, tuple[int, int]]] = {
    "cpu": {"latency": (3, 15), "throughput": (1, 5)},  # few: a trial measures on the CPU it trains on
    "cuda": {"latency": (10, 50), "throughput": (3, 20)},
}


def _timing_how(what: str) -> str:
    (cw, ct), (gw, gt) = MEASURE_REPEATS["cpu"][what], MEASURE_REPEATS["cuda"][what]
    return (
        f"on the trial's device, the median of {ct} timed forwards after {cw} warm-up on a CPU ({gt} after {gw} "
        "on CUDA, synchronized); eval mode, float32, torch.inference_mode, random images; measured once per trial, "
        "at its first epoch (training changes no architecture): kdsearch.train.measure"
    )


FLOPS_COUNTED = (
    "per image at inference, 2 FLOPs per multiply-add, convolutions, linear layers and both attention "
    "matmuls included, elementwise work not counted (as torch.utils.flop_counter.FlopCounterMode on the "
    "explicit attention path); exact formula: kdsearch.count_flops"
)

OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective, replace: bool = False) -> Objective:
    """Add an objective to the table (in the process that loads the space: the driver).

    Ray workers receive the objectives of a search with the trial (pickled with their
    functions), so a `measure` defined in a user's module or a test needs no registration there.
    """
    if objective.mode not in MODES:
        raise ValueError(f"objective {objective.name}: mode must be max or min, got {objective.mode!r}")
    if objective.compute is not None and objective.measure is not None:
        raise ValueError(f"objective {objective.name}: give compute or measure, not both")
    if objective.name in OBJECTIVES and not replace and OBJECTIVES[objective.name] != objective:
        raise ValueError(f"objective {objective.name} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


for _o in (
    Objective(
        "val_acc",
        "max",
        "fraction of the val images classified right",
        "top-1 accuracy on the val split after each epoch",
        fmt=".4f",
        worst=0.0,
        best=1.0,
    ),
    Objective(
        "flops",
        "min",
        "FLOPs per image at inference, 2 per multiply-add, attention included",
        FLOPS_COUNTED,
        scale=1e6,
        shown_as="MFLOPs",
        fmt=".3f",
        compute=_flops,
    ),
    Objective(
        "macs",
        "min",
        "multiply-adds per image at inference, attention included",
        "FLOPs / 2, exact",
        scale=1e6,
        shown_as="MMACs",
        fmt=".3f",
        compute=_macs,
    ),
    Objective(
        "params", "min", "trainable parameters", "exact formula from the student's spec", fmt=",.0f", compute=_params
    ),
    Objective(
        "latency_ms",
        "min",
        "milliseconds per forward of one image (batch 1)",
        "batch 1, " + _timing_how("latency"),
        shown_as="latency ms",
        fmt=".3g",
        measure=partial(_measured, "latency_ms"),
    ),
    Objective(
        "throughput",
        "max",
        f"images per second at batch {MEASURE_BATCH}",
        f"batch {MEASURE_BATCH} / the median time of its forward, " + _timing_how("throughput"),
        shown_as="images/s",
        fmt=".4g",
        measure=partial(_measured, "throughput"),
        worst=0.0,
    ),
    Objective(
        "inference_memory",
        "min",
        f"bytes at the peak of one inference forward at batch {MEASURE_BATCH}, weights included",
        f"batch {MEASURE_BATCH}: the weights' bytes plus the peak of the bytes allocated for the input and one forward "
        "(CUDA: torch.cuda.max_memory_allocated after a reset, above what was allocated before; CPU: the running sum "
        "of torch.profiler's allocation and free events, at its peak); on the trial's device, eval mode, float32, "
        "measured once per trial at its first epoch: kdsearch.train.measure",
        scale=2**20,
        shown_as="inference MiB",
        fmt=".3g",
        measure=partial(_measured, "inference_memory"),
    ),
):
    register(_o)


def get(name: str) -> Objective:
    """The table's entry, or a plain description for a name the table lacks (a run recorded
    with an objective registered elsewhere still reads)."""
    return OBJECTIVES.get(name) or Objective(name, "min", "", "recorded by the run")


def names(source: str) -> list[str]:
    """The names of the table's objectives obtained one way ("computed", "measured", "trained")."""
    return [name for name, o in OBJECTIVES.items() if o.source == source]


def computed(student: Any) -> dict[str, float]:
    """Every computed objective of the table for a student spec (cheap, exact)."""
    return {o.name: o.compute(student) for o in OBJECTIVES.values() if o.compute is not None}


def measured(objectives: Iterable[Objective], ctx: MeasureContext) -> dict[str, float]:
    """The measured objectives among `objectives`, measured now."""
    return {o.name: float(o.measure(ctx)) for o in objectives if o.measure is not None}


# --------------------------------------------------------------------------------------
# A run's objectives: (name, mode) pairs, as run.json and the space hold them
# --------------------------------------------------------------------------------------

Pairs = Sequence[tuple[str, str]]

DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (("val_acc", "max"), ("flops", "min"))


def accuracy_and_cost(objectives: Pairs) -> tuple[str, str]:
    """The objective drawn up (the first maximized) and across (the first minimized)."""
    acc = next((m for m, mode in objectives if mode == "max"), "val_acc")
    cost = next((m for m, mode in objectives if mode == "min"), "flops")
    return acc, cost


def parse_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """`["val_acc", "params:min"]` -> pairs; a bare name takes the table's direction. KeyError
    for a name the table lacks."""
    out = []
    for item in names:
        name, _, mode = item.partition(":")
        if name not in OBJECTIVES:
            raise KeyError(name)
        if mode and mode not in MODES:
            raise ValueError(f"{item}: the direction must be max or min")
        out.append((name, mode or OBJECTIVES[name].mode))
    return out


def values_for_sampler(result: Mapping[str, Any], objectives: Pairs) -> list[float]:
    """The values Optuna is told for a trial's last result: a value the trial never measured
    (it was over the budget and never trained) is the objective's worst."""
    out = []
    for name, mode in objectives:
        v = result.get(name)
        out.append(get(name).worst_value(mode) if v is None else float(v))
    return out
