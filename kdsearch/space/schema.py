"""What each key of a space file may hold, and the one check of a value against it.

Every section of a space file is one dataclass, and every key of a section one of its
`setting` fields (kdsearch.space.specs.setting): the key's type is the field's annotation,
its default the field's, the values allowed the field's `allowed` (in words) and `check`.
`SEARCHABLE` and `PLAIN` are read from those fields, so a key is stated once, on its field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from kdsearch.errors import SpaceError
from kdsearch.space.search_space import Budget, EarlyStopping, Resources, SearchSettings
from kdsearch.space.specs import DataSpec, RecipeSpec, StudentSpec, TeacherSpec, TrainSpec

INT_BOUND = 2**63  # every integer fits an int64 (the run's Parquet columns, torch, numpy)


@dataclass(frozen=True)
class Key:
    """One leaf key of the space file: its type, the values allowed, and its default."""

    kind: str  # "int" | "float" | "bool" | "str"
    default: Any = None
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # words for the error message: what `check` accepts
    optional: bool = False  # None is a valid value


def keys_of(spec_cls: type) -> dict[str, Key]:
    """The keys of a dataclass's `setting` fields, in field order.

    Args:
        spec_cls: A dataclass whose space-file keys are `kdsearch.space.specs.setting` fields.

    Returns:
        Each key's name -> its `Key`: the type from the field's annotation (`X | None` allows
        null), the default, the check and the words from the field (an `optional` field's
        default is None: the space file leaves its value to the data).
    """
    out = {}
    for f in fields(spec_cls):
        if "allowed" not in f.metadata:
            continue
        optional = str(f.type).endswith(" | None") or f.metadata["optional"]
        kind = str(f.type).removesuffix(" | None")
        out[f.name] = Key(kind, None if optional else f.default, f.metadata["check"], f.metadata["allowed"], optional)
    return out


SEARCHABLE_SPECS: dict[str, type] = {"student": StudentSpec, "recipe": RecipeSpec, "train": TrainSpec}
"""The sections whose keys a space may fix or search, each the spec of a trial it makes."""

PLAIN_SPECS: dict[str, type] = {
    "data": DataSpec,
    "teacher": TeacherSpec,
    "budget": Budget,
    "resources": Resources,
    "early_stopping": EarlyStopping,
    "search": SearchSettings,
}
"""The sections whose keys hold one value each, and the dataclass each section builds."""

_STUDENT = keys_of(StudentSpec)
SEARCHABLE: dict[str, dict[str, Key]] = {
    "student": {
        # exactly one of the two widths (head_dim x num_heads makes embed_dim), so both are optional
        "embed_dim": dataclasses.replace(_STUDENT["embed_dim"], default=None, optional=True),
        "head_dim": dataclasses.replace(_STUDENT["embed_dim"], default=None, optional=True),
        **{k: _STUDENT[k] for k in ("depth", "num_heads", "mlp_ratio", "patch_size", "pos_embed", "distill_token")},
    },
    "recipe": keys_of(RecipeSpec),
    "train": keys_of(TrainSpec),
}

PLAIN: dict[str, dict[str, Key]] = {section: keys_of(cls) for section, cls in PLAIN_SPECS.items()}

TOP_LEVEL = ("name", "description", "objectives", *SEARCHABLE, *PLAIN, "hypervolume")


def value_key(spec: Key) -> Key:
    """The key of one value a searchable key holds: never null (an optional searchable key,
    embed_dim or head_dim, may only be left out)."""
    return dataclasses.replace(spec, optional=False)


def check_scalar(source: str, key: str, value: Any, spec: Key) -> Any:
    """One value of the key's type that passes its check; ints are accepted for floats.

    Args:
        source: The space file, named by the error.
        key: The dotted key, named by the error.
        value: The value as YAML read it.
        spec: What the key may hold.

    Returns:
        The value (an int given for a float key as a float).

    Raises:
        SpaceError: The value is not of the key's type, not within int64, or not allowed.
    """
    if value is None:
        if spec.optional:
            return None
        raise SpaceError(source, key, f"must be {spec.allowed or 'a ' + spec.kind}, got null")
    kind = spec.kind
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, float):
            ok = math.isfinite(value)
        elif ok and -INT_BOUND <= value < INT_BOUND:
            value = float(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "text"}[kind]
        raise SpaceError(source, key, f"must be {want}, got {value!r} ({type_name(value)})")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_BOUND <= value < INT_BOUND:
        allowed = spec.allowed or "a " + kind
        raise SpaceError(source, key, f"must be {allowed} and below 2**63 (64 bits), got {_digits(value)}")
    if spec.check is not None and not spec.check(value):
        raise SpaceError(source, key, f"must be {spec.allowed}, got {value!r}")
    return value


def no_unknown(source: str, where: str, body: dict, allowed: tuple[str, ...]) -> None:
    """Raise SpaceError on the first key of `body` (the mapping at `where`) not in `allowed`,
    naming the nearest allowed key."""
    for k in body:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            key = f"{where}.{k}" if where else str(k)
            raise SpaceError(source, key, f"unknown key{hint}; allowed: {', '.join(allowed)}")


def _digits(value: int) -> str:
    """A huge integer, said without printing all of it."""
    return f"an integer of {value.bit_length():,} bits" if abs(value) >= 10**30 else str(value)


def type_name(v: Any) -> str:
    """What a YAML value is, in the words of the space file's errors ("a mapping", "text")."""
    return {
        dict: "a mapping",
        list: "a list",
        str: "text",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(v), type(v).__name__)
