"""One searchable dimension of a space: a fixed value, a choice list, an int or a float range.

Each dimension can be suggested through an Optuna-style trial (define-by-run: only
`trial.suggest_*` is called, so `optuna.trial.FixedTrial` replays any config), sampled
uniformly for summaries, enumerated when finite, and knows its default value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class SuggestTrial(Protocol):
    """What a define-by-run space needs of a trial: optuna.Trial and FixedTrial both fit."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...


@dataclass(frozen=True)
class Fixed:
    value: Any

    def suggest(self, trial: SuggestTrial, name: str) -> Any:
        return self.value

    def sample(self, rng: np.random.Generator) -> Any:
        return self.value

    @property
    def default(self) -> Any:
        return self.value

    def values(self) -> list[Any]:
        return [self.value]

    def describe(self) -> str:
        return f"{self.value!r} (fixed)"


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]
    default_value: Any = None

    def suggest(self, trial: SuggestTrial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def sample(self, rng: np.random.Generator) -> Any:
        return self.choices[int(rng.integers(len(self.choices)))]

    @property
    def default(self) -> Any:
        return self.choices[0] if self.default_value is None else self.default_value

    def values(self) -> list[Any]:
        return list(self.choices)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False
    default_value: int | None = None

    def suggest(self, trial: SuggestTrial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def sample(self, rng: np.random.Generator) -> int:
        if self.log:  # log-uniform over [low, high + 1), floored: what Optuna's log int draws
            v = int(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1))))
            v = self.low + (min(max(v, self.low), self.high) - self.low) // self.step * self.step
            return v
        return int(rng.choice(self.values()))

    @property
    def default(self) -> int:
        if self.default_value is not None:
            return self.default_value
        vals = self.values()
        return vals[(len(vals) - 1) // 2]

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def contains(self, v: Any) -> bool:
        """On the range's step grid (checked for a `default`)."""
        return (
            isinstance(v, int)
            and not isinstance(v, bool)
            and self.low <= v <= self.high
            and (v - self.low) % self.step == 0
        )

    def describe(self) -> str:
        step = f" step {self.step}" if self.step != 1 else ""
        return f"int {self.low}..{self.high}{step}{' (log)' if self.log else ''}"


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None
    log: bool = False
    default_value: float | None = None

    def suggest(self, trial: SuggestTrial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def sample(self, rng: np.random.Generator) -> float:
        if self.step is not None:
            return float(rng.choice(self.values()))
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    @property
    def default(self) -> float:
        if self.default_value is not None:
            return self.default_value
        if self.log:
            return float(math.sqrt(self.low * self.high))
        return (self.low + self.high) / 2

    def values(self) -> list[float]:
        """The grid when there is a step; otherwise the two ends (enough for monotone bounds)."""
        if self.step is None:
            return [self.low, self.high] if self.high > self.low else [self.low]
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [self.low + i * self.step for i in range(n + 1)]

    def describe(self) -> str:
        step = f" step {self.step}" if self.step is not None else ""
        return f"float {self.low}..{self.high}{step}{' (log)' if self.log else ''}"


Dimension = Fixed | Choice | IntRange | FloatRange


def cardinality(dim: Dimension) -> float:
    """How many distinct values a dimension holds (inf for a continuous float range)."""
    if isinstance(dim, FloatRange) and dim.step is None and dim.high > dim.low:
        return math.inf
    return len(dim.values())
