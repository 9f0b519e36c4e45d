"""How a space file writes a searchable key: a fixed value, a choice list or a range.

    depth: 4                                   # fixed
    depth: [2, 4, 6]                           # choice
    depth: {choices: [2, 4, 6], default: 4}    # choice with the default a single trial uses
    depth: {low: 2, high: 8, step: 2}          # int range (log: true for log scale)
    lr: {low: 1.0e-4, high: 3.0e-3, log: true} # float range

Each value is checked against the key's schema (kdsearch.space.schema); the result is a
`kdsearch.space.dimensions.Dimension`.
"""

from __future__ import annotations

import math
from typing import Any

from kdsearch.errors import SpaceError
from kdsearch.space.dimensions import Choice, Dimension, Fixed, FloatRange, IntRange
from kdsearch.space.schema import Key, check_scalar, no_unknown, type_name

MAX_RANGE_VALUES = 10_000  # a range with a step (every int range has one) holds at most this many values

_RANGE_KEYS = ("low", "high", "step", "log", "default")
_CHOICE_KEYS = ("choices", "default")


def parse_dimension(source: str, key: str, value: Any, spec: Key) -> Dimension:
    """The dimension a searchable key's value writes.

    Args:
        source: The space file, named by the error.
        key: The dotted key (`student.depth`), named by the error.
        value: The key's value as YAML read it.
        spec: What each value of the key may be (`kdsearch.space.schema.value_key`).

    Returns:
        `Fixed`, `Choice`, `IntRange` or `FloatRange`.

    Raises:
        SpaceError: Any value or bound the key does not allow, or a malformed choice or range.
    """
    if isinstance(value, list):
        return _parse_choice(source, key, value, None, spec)
    if not isinstance(value, dict):
        return Fixed(check_scalar(source, key, value, spec))
    if "choices" in value:
        no_unknown(source, key, value, _CHOICE_KEYS)
        if not isinstance(value["choices"], list):
            raise SpaceError(source, f"{key}.choices", f"must be a list, got {type_name(value['choices'])}")
        return _parse_choice(source, key, value["choices"], value.get("default"), spec)
    if "low" in value or "high" in value:
        no_unknown(source, key, value, _RANGE_KEYS)
        return _parse_range(source, key, value, spec)
    raise SpaceError(
        source, key, "a mapping must hold either choices: [...] or low: and high: (with optional step, log, default)"
    )


def within(dim: Dimension, value: Any) -> bool:
    """Whether `value` (of the dimension's type) is one the dimension may take."""
    if isinstance(dim, FloatRange):
        return dim.low <= value <= dim.high
    if isinstance(dim, IntRange):
        return dim.contains(value)
    return value in dim.values()


def _parse_choice(source: str, key: str, items: list, default: Any, spec: Key) -> Choice:
    if not items:
        raise SpaceError(source, key, "empty choice list; give at least one value")
    choices = tuple(check_scalar(source, f"{key}[{i}]", v, spec) for i, v in enumerate(items))
    dupes = sorted({repr(c) for c in choices if choices.count(c) > 1})
    if dupes:
        raise SpaceError(source, key, f"duplicate choice {', '.join(dupes)}")
    if default is not None:
        default = check_scalar(source, f"{key}.default", default, spec)
        if default not in choices:
            raise SpaceError(source, f"{key}.default", f"{default!r} is not one of the choices {list(choices)}")
    return Choice(choices, default)


def _parse_range(source: str, key: str, value: dict, spec: Key) -> Dimension:
    if spec.kind not in ("int", "float"):
        raise SpaceError(source, key, f"a {spec.kind} value cannot be a range; use a choice list")
    for end in ("low", "high"):
        if end not in value:
            raise SpaceError(source, key, f"a range needs both low and high; {end} is missing")
    low = check_scalar(source, f"{key}.low", value["low"], spec)
    high = check_scalar(source, f"{key}.high", value["high"], spec)
    if low > high:
        raise SpaceError(source, key, f"low {low} is greater than high {high}")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(source, f"{key}.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(source, f"{key}.log", f"a log range needs low > 0, got {low}")
    step = _parse_step(source, key, value.get("step"), low, high, log, spec)
    default = value.get("default")
    if default is not None:
        default = check_scalar(source, f"{key}.default", default, spec)
        if not low <= default <= high:
            raise SpaceError(source, f"{key}.default", f"{default} is outside [{low}, {high}]")
    if spec.kind == "int":
        dim = IntRange(low, high, step or 1, log, default)
        if default is not None and not dim.contains(default):
            raise SpaceError(source, f"{key}.default", f"{default} is not on the range's step grid")
        return dim
    return FloatRange(low, high, step, log, default)


def _parse_step(source: str, key: str, step: Any, low: Any, high: Any, log: bool, spec: Key) -> Any:
    """A range's step (None: none): > 0, not beside log, a whole number of steps from low to
    high, and at most MAX_RANGE_VALUES values on the grid (an int range always has one)."""
    if step is not None:
        step = check_scalar(source, f"{key}.step", step, Key(spec.kind, check=lambda v: v > 0, allowed="a number > 0"))
        if log:
            raise SpaceError(source, key, "step and log cannot be used together (Optuna does not support it)")
    if step is not None or spec.kind == "int":  # a grid, listed whole by Dimension.values()
        count = (high - low) / (step or 1) + 1
        if not count <= MAX_RANGE_VALUES:
            raise SpaceError(
                source, key, f"the range holds {count:,.0f} values, more than {MAX_RANGE_VALUES:,}; use a larger step"
            )
    if step is not None:
        if (
            spec.kind == "float"
            and not math.isclose(((high - low) / step) % 1, 0, abs_tol=1e-9)
            and not math.isclose(((high - low) / step) % 1, 1, abs_tol=1e-9)
        ):
            raise SpaceError(source, f"{key}.step", f"(high - low) = {high - low} is not a multiple of step {step}")
        if spec.kind == "int" and (high - low) % step:
            raise SpaceError(source, f"{key}.step", f"(high - low) = {high - low} is not a multiple of step {step}")
    return step
