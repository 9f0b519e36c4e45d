"""A run's hypervolume in all its objectives, against a reference point fixed by its space.

The reference (`SearchSpace.reference_point`: stated in the file, else each objective's worst,
budget or largest value over the space) is written to run.json when the run starts, so every
reader (`status`, the live view, `pareto`, the report) measures against the same point and
runs of one space compare. The value is normalized: each objective scaled from its reference
(0) to its ideal (1: accuracy 1, a cost 0), so it is the fraction of that box the completed
trials dominate, in [0, 1]. The math is kdsearch.results.pareto's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import hypervolume_history, non_dominated_mask, normalized_hypervolume
from kdsearch.results.tables import RunPaths
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Pairs

REFERENCE_KEY = "hypervolume_reference"  # run.json: {objective: reference value, raw units}


@dataclass
class Hypervolume:
    """A run's normalized hypervolume, or (value None) the plain reason it has none."""

    value: float | None
    reference: dict[str, float] = field(default_factory=dict)  # raw units, per objective
    ideal: dict[str, float] = field(default_factory=dict)
    by_trial: list[dict[str, Any]] = field(default_factory=list)  # [{"trial": n, "seconds": s, "hypervolume": v}]
    why_not: str = ""

    def describe(self) -> str:
        """One line saying the value and its box, or why there is none."""
        if self.value is None:
            return f"hypervolume: none ({self.why_not})"
        return (
            f"hypervolume {self.value:.4f} of the box from the reference ({_point(self.reference)}) "
            f"to the ideal ({_point(self.ideal)})"
        )

    def as_json(self) -> dict[str, Any]:
        """Plain JSON data (`pareto --format json`'s `hypervolume`); `from_json` reads it back."""
        return {
            "value": self.value,
            "reference": self.reference,
            "ideal": self.ideal,
            "normalized": True,
            "why_not": self.why_not or None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Hypervolume:
        """The Hypervolume `as_json` wrote."""
        return cls(d["value"], dict(d["reference"]), dict(d["ideal"]), why_not=d["why_not"] or "")


def _point(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {_num(v)}" for name, v in values.items())


def _num(v: float) -> str:
    """2.1e8 rather than 2.1e+08; 0 rather than 0.0."""
    return f"{v:.4g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def run_reference(paths: RunPaths, meta: Mapping[str, Any], objectives: Pairs) -> tuple[dict[str, float], str]:
    """The reference point for `objectives` and, where an objective has none, why.

    run.json's (written when the run started) for the run's own objectives; for a run.json
    without that key, or objectives given with `--objectives`, the space's, from the run's space.yaml.
    """
    own = {tuple(o) for o in meta.get("objectives", [])}
    stated = meta.get(REFERENCE_KEY) or {}
    out = {name: float(stated[name]) for name, mode in objectives if name in stated and (name, mode) in own}
    missing = [(name, mode) for name, mode in objectives if name not in out]
    if not missing:
        return out, ""
    try:
        space = _space_of(paths)
    except Exception as e:  # a space.yaml this version cannot read: say so rather than fail the view
        return (
            out,
            f"no reference point for {', '.join(n for n, _ in missing)}: the run's space.yaml does not load ({e})",
        )
    out.update(space.reference_point(missing))
    lacking = [name for name, _ in missing if name not in out]
    if lacking:
        example = ", ".join(f"{name}: VALUE" for name in lacking)
        return out, (
            f"no reference point for {', '.join(lacking)} (no budget and no largest value over the space): "
            f"state it in the space file, e.g. hypervolume: {{reference: {{{example}}}}}"
        )
    return out, ""


def _space_of(paths: RunPaths):
    from kdsearch.space.file import parse_space, parse_value

    return parse_space(parse_value(paths.store.read_text(RunPaths.SPACE)), source=paths.store.uri_of(RunPaths.SPACE))


def hypervolume_of(
    trials: Sequence[dict[str, Any]],
    objectives: Pairs,
    reference: Mapping[str, float],
    started: float = 0.0,
    why_no_reference: str = "",
    history: bool = True,
) -> Hypervolume:
    """The normalized hypervolume of the completed trials in every objective, against
    `reference` (raw units); with `history`, its value after each trial by finish time."""
    if any(name not in reference for name, _ in objectives):
        lacking = ", ".join(name for name, _ in objectives if name not in reference)
        return Hypervolume(None, why_not=why_no_reference or f"no reference point for {lacking}")
    ref = {name: float(reference[name]) for name, _ in objectives}
    ideal = {name: objective_table.get(name).ideal_value(mode) for name, mode in objectives}
    if any(v is None for v in ideal.values()):
        none = ", ".join(name for name, v in ideal.items() if v is None)
        return Hypervolume(None, ref, why_not=f"{none}: maximized with no known best value (Objective.best)")
    maximize = [mode == "max" for _, mode in objectives]
    if any((r >= ideal[n]) if mx else (r <= ideal[n]) for (n, r), mx in zip(ref.items(), maximize)):
        return Hypervolume(None, ref, ideal, why_not=f"the reference ({_point(ref)}) is not worse than the ideal")
    done = sorted(
        (r for r in trials if r.get("status") == Status.COMPLETED and all(r.get(n) is not None for n, _ in objectives)),
        key=lambda r: r.get("finished_at") or 0,
    )
    points = np.array([[float(r[n]) for n, _ in objectives] for r in done]).reshape(-1, len(objectives))
    bounds = (list(ref.values()), list(ideal.values()))
    # the front's volume is the trials' volume: the dominated ones add nothing (and WFG's cost grows with the points)
    value = normalized_hypervolume(points[non_dominated_mask(points, maximize)], maximize, *bounds)
    by_trial = []
    if history and done:
        by_trial = [
            {
                "trial": i + 1,
                "trial_id": r["trial_id"],
                "seconds": (r.get("finished_at") or started) - started,
                "hypervolume": float(v),
            }
            for i, (r, v) in enumerate(zip(done, hypervolume_history(points, maximize, *bounds)))
        ]
    return Hypervolume(value, ref, ideal, by_trial)
