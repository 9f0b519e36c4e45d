"""The search-space file language: its schema, parsing, validation and error messages.

A space file names the data, the teacher, the student dimensions, the distillation recipe,
the training settings, the objectives, the budgets, per-trial resources and the sampler.
Every value under `student`, `recipe` and `train` may be searched; it is written as

    depth: 4                                   # fixed
    depth: [2, 4, 6]                           # choice
    depth: {choices: [2, 4, 6], default: 4}    # choice with the default a single trial uses
    depth: {low: 2, high: 8, step: 2}          # int range (log: true for log scale)
    lr: {low: 1.0e-4, high: 3.0e-3, log: true} # float range

Everything is validated when the file is loaded, for every combination the space holds:
a bad file raises `SpaceError` naming the file, the key and what is allowed, and no
sampled config can be inconsistent (the student rules are `StudentSpec.problems`). The keys
under `student`, `recipe` and `train`, their types, defaults and allowed values are the specs'
`searchable` fields (kdsearch.space.specs). The result is a
`kdsearch.space.search_space.SearchSpace`; `parse_sets` checks `--set key=value` overrides
against the same schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kdsearch.errors import SpaceError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.dimensions import Choice, Dimension, Fixed, FloatRange, IntRange
from kdsearch.space.flops import count_flops
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, MODES, OBJECTIVES
from kdsearch.space.samplers import SAMPLERS
from kdsearch.space.search_space import (
    Budget,
    EarlyStopping,
    Resources,
    SearchSettings,
    SearchSpace,
    iter_architectures,
)
from kdsearch.space.specs import BUILTIN_TEACHER, DataSpec, RecipeSpec, StudentSpec, TeacherSpec, TrainSpec

# --------------------------------------------------------------------------------------
# What each key may hold
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One leaf key of the space file: its type, the values allowed, and its default."""

    kind: str  # "int" | "float" | "bool" | "str"
    default: Any = None
    check: Callable[[Any], bool] | None = None
    allowed: str = ""  # words for the error message: what `check` accepts
    optional: bool = False  # None is a valid value


def _ge(x: float) -> Callable[[Any], bool]:
    return lambda v: v >= x


def _gt(x: float) -> Callable[[Any], bool]:
    return lambda v: v > x


def _one_of(values: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in values


def _a_path(v: str) -> bool:
    return "\0" not in v


SEED_MAX = 2**32 - 1  # Optuna's samplers and NumPy take seeds 0 .. 2**32 - 1
INT_BOUND = 2**63  # every integer fits an int64 (the run's Parquet columns, torch, numpy)
MAX_RANGE_VALUES = 10_000  # a range with a step (every int range has one) holds at most this many values
MAX_STUDENT_CHECKS = 100_000  # (width, num_heads, pos_embed) combinations `_check_student` tries


def _keys(spec_cls: type) -> dict[str, Key]:
    """The keys of a spec's searchable fields: the type from its annotation, the default and
    the values allowed from the field itself (`kdsearch.space.specs.searchable`)."""
    return {
        f.name: Key(
            str(f.type).removesuffix(" | None"),
            f.default,
            f.metadata["check"],
            f.metadata["allowed"],
            optional=str(f.type).endswith(" | None"),  # `X | None`: null is allowed
        )
        for f in fields(spec_cls)
        if "allowed" in f.metadata
    }


_STUDENT = _keys(StudentSpec)
SEARCHABLE: dict[str, dict[str, Key]] = {
    "student": {
        # exactly one of the two widths (head_dim x num_heads makes embed_dim), so both are optional
        "embed_dim": dataclasses.replace(_STUDENT["embed_dim"], default=None, optional=True),
        "head_dim": dataclasses.replace(_STUDENT["embed_dim"], default=None, optional=True),
        **{k: _STUDENT[k] for k in ("depth", "num_heads", "mlp_ratio", "patch_size", "pos_embed", "distill_token")},
    },
    "recipe": _keys(RecipeSpec),
    "train": _keys(TrainSpec),
}

PLAIN: dict[str, dict[str, Key]] = {
    "data": {
        "name": Key("str", "digits", _one_of(tuple(DATASETS)), "one of " + ", ".join(DATASETS)),
        "img_size": Key("int", None, _ge(1), "an integer >= 1", optional=True),
        "root": Key("str", None, _a_path, "a folder's path", optional=True),
        "num_classes": Key("int", None, _ge(2), "an integer >= 2", optional=True),
        "val_fraction": Key("float", 0.2, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
        "augment": Key("bool", False),
        "test_fraction": Key("float", 0.2, lambda v: 0 < v < 1, "a number strictly between 0 and 1"),
    },
    "teacher": {
        "model": Key(
            "str", "kdsearch/digits_cnn", lambda v: bool(v.strip()), "a timm model name or kdsearch/digits_cnn"
        ),
        "checkpoint": Key("str", None, _a_path, "a file's path", optional=True),
        "pretrained": Key("bool", False),
        "cache_topk": Key("int", 10, _ge(1), "an integer >= 1 (logits kept per image above 100 classes)"),
    },
    "budget": {
        "max_gflops": Key("float", None, _gt(0), "a number of GFLOPs > 0, or null", optional=True),
        "max_params": Key("int", None, _gt(0), "a parameter count > 0, or null", optional=True),
    },
    "resources": {
        "cpus": Key("float", 1.0, _gt(0), "a number > 0"),
        "gpus": Key("float", 0.0, _ge(0), "a number >= 0 (fractions share a GPU)"),
    },
    "early_stopping": {
        "enabled": Key("bool", True),
        "grace_epochs": Key("int", 5, _ge(1), "an integer >= 1"),
        "reduction_factor": Key("int", 2, _ge(2), "an integer >= 2"),
        "beaten_by": Key("int", 2, _ge(1), "an integer >= 1"),
    },
    "search": {
        "trials": Key("int", 16, _ge(1), "an integer >= 1"),
        "population_size": Key("int", None, _ge(2), "an integer >= 2 (NSGA-II), or null", optional=True),
        "sampler": Key("str", "nsga2", _one_of(tuple(SAMPLERS)), "one of " + ", ".join(SAMPLERS)),
        "seed": Key("int", 0, lambda v: 0 <= v <= SEED_MAX, f"an integer from 0 to {SEED_MAX} (2**32 - 1)"),
        "max_failures": Key("int", 1, _ge(0), "an integer >= 0"),
        "checkpoint_every": Key("int", 1, _ge(0), "an integer >= 0 (epochs between a trial's checkpoints; 0: none)"),
        "max_concurrent": Key("int", None, _ge(1), "an integer >= 1, or null", optional=True),
    },
}


def _value(spec: Key) -> Key:
    """A searchable key's values are never null (an optional one, embed_dim or head_dim, may be absent)."""
    return dataclasses.replace(spec, optional=False)


TOP_LEVEL = ("name", "description", "objectives", *SEARCHABLE, *PLAIN, "hypervolume")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1); accept YAML 1.2 floats like every user expects.

    Nesting stops at MAX_DEPTH levels: PyYAML's scanner is quadratic in the depth of flow
    collections and its composer recursive (`[` x 5000 took 7 s, then a RecursionError)."""

    MAX_DEPTH = 50
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > self.MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {self.MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass
class _Ctx:
    source: str

    def fail(self, key: str, message: str) -> SpaceError:
        return SpaceError(self.source, key, message)


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and validate a space file. Raises `SpaceError` (one clear line) on any problem."""
    p = Path(path)
    source = str(path)
    ctx = _Ctx(source)
    if not p.is_file():
        raise ctx.fail("", "no such file" if not p.exists() else "is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ctx.fail("", f"cannot read: {e}") from None
    return parse_space_text(text, source=source, base_dir=p.resolve().parent)


def parse_space_text(text: str, source: str = "<space>", base_dir: Path | None = None) -> SearchSpace:
    """Read and validate a space file's text (a run's stored space.yaml); relative paths in it
    resolve against `base_dir`."""
    ctx = _Ctx(source)
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        tag = re.search(r"tag '([^']*)'", e.problem or "")
        if tag:  # !!python/object/apply:... and friends: never constructed, always refused
            name = tag[1].replace("tag:yaml.org,2002:", "!!")
            raise ctx.fail(
                "", f"{where}the tag {name} is not allowed; a space file holds plain YAML (no tags that make objects)"
            ) from None
        raise ctx.fail("", f"not valid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ctx.fail("", f"not valid YAML: {where}{problem}") from None
    except ValueError as e:  # PyYAML's constructors: a date like 2001-13-45, an int of over 4,300 digits
        raise ctx.fail("", f"not valid YAML: a value cannot be read: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise ctx.fail("", "not valid YAML: nested too deeply for the parser") from None
    return parse_space(raw, source=source, base_dir=base_dir)


def parse_space(raw: Any, source: str = "<space>", base_dir: Path | None = None) -> SearchSpace:
    """Validate an already-parsed mapping (what `load_space` does after reading YAML)."""
    ctx = _Ctx(source)
    base_dir = base_dir or Path.cwd()
    if raw is None:
        raise ctx.fail("", "is empty; a space needs at least a student section")
    if not isinstance(raw, dict):
        raise ctx.fail("", f"must be a mapping of sections ({', '.join(TOP_LEVEL)}), got {_type(raw)}")
    _no_unknown(ctx, "", raw, TOP_LEVEL)
    if "student" not in raw:
        raise ctx.fail("student", "is missing; a space needs a student section")

    name = raw.get("name", re.sub(r"[^A-Za-z0-9_.-]", "", Path(source).stem) or "space")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ctx.fail("name", f"must be a word of letters, digits, '_', '-' or '.', got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ctx.fail("description", f"must be text, got {_type(description)}")

    search_body = raw.get("search")
    enqueue = search_body.get("enqueue") if isinstance(search_body, dict) else None
    if isinstance(search_body, dict) and "enqueue" in search_body:  # a list of configs, not a scalar key
        search_body = {k: v for k, v in search_body.items() if k != "enqueue"}
    plain = {
        section: _parse_plain(ctx, section, search_body if section == "search" else raw.get(section))
        for section in PLAIN
    }
    data = _parse_data(ctx, plain["data"], base_dir)
    teacher = _parse_teacher(ctx, plain["teacher"], base_dir)

    dims: dict[str, Dimension] = {}
    for section, keys in SEARCHABLE.items():
        body = raw.get(section, {})
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ctx.fail(section, f"must be a mapping of keys ({', '.join(keys)}), got {_type(body)}")
        _no_unknown(ctx, section, body, tuple(keys))
        for name_, spec in keys.items():
            if name_ in body and not (spec.optional and body[name_] is None):  # null: an optional key left out
                dims[f"{section}.{name_}"] = _parse_dimension(ctx, f"{section}.{name_}", body[name_], _value(spec))
            elif spec.default is not None:
                dims[f"{section}.{name_}"] = Fixed(spec.default)

    _check_student(ctx, dims, data)
    if teacher.model == BUILTIN_TEACHER and max(dims["recipe.attention_weight"].values()) > 0:
        raise ctx.fail(
            "recipe.attention_weight", f"the teacher {BUILTIN_TEACHER} is a CNN with no attention maps; keep it 0"
        )
    objectives = _parse_objectives(ctx, raw.get("objectives"))
    reference = _parse_hypervolume(ctx, raw.get("hypervolume"), dict(objectives))
    budget = Budget(**plain["budget"])
    space = SearchSpace(
        name=name,
        source=source,
        dims=dims,
        data=data,
        teacher=teacher,
        objectives=objectives,
        budget=budget,
        resources=Resources(**plain["resources"]),
        search=SearchSettings(**plain["search"], enqueue=_parse_enqueue(ctx, enqueue, dims)),
        early_stopping=EarlyStopping(**plain["early_stopping"]),
        description=description,
        reference=reference,
        raw=raw,
    )
    _check_budget_meetable(ctx, space)
    return space


# ---- sections -------------------------------------------------------------------------


def _parse_plain(ctx: _Ctx, section: str, body: Any) -> dict[str, Any]:
    keys = PLAIN[section]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ctx.fail(section, f"must be a mapping of keys ({', '.join(keys)}), got {_type(body)}")
    _no_unknown(ctx, section, body, tuple(keys))
    out = {}
    for name, spec in keys.items():
        key = f"{section}.{name}"
        out[name] = _check_scalar(ctx, key, body[name], spec) if name in body else spec.default
    return out


def _parse_enqueue(ctx: _Ctx, items: Any, dims: dict[str, Dimension]) -> tuple[dict[str, Any], ...]:
    """`search.enqueue`: configs the search tries first, in order (Optuna's enqueue_trial), each a
    mapping of dotted dimension names to values, e.g. {student.embed_dim: 192, student.depth: 12};
    the dimensions a config leaves out are sampled. Every key must be a dimension of the space and
    every value one it allows."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ctx.fail("search.enqueue", f"must be a list of configs ({{student.depth: 4, ...}}), got {_type(items)}")
    out = []
    for i, config in enumerate(items):
        where = f"search.enqueue[{i}]"
        if not isinstance(config, dict) or not config:
            raise ctx.fail(where, f"must be a mapping of dimension names to values, got {_type(config)}")
        for key, value in config.items():
            if key not in dims:
                near = difflib.get_close_matches(str(key), list(dims), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ctx.fail(f"{where}.{key}", f"is not a dimension of this space{hint}; known: {', '.join(dims)}")
            section, _, name = key.partition(".")
            value = _check_scalar(ctx, f"{where}.{key}", value, _value(SEARCHABLE[section][name]))
            dim = dims[key]
            if not _within(dim, value):
                raise ctx.fail(f"{where}.{key}", f"{value!r} is not in the space: {dim.describe()}")
            config[key] = value
        out.append(dict(config))
    return tuple(out)


def _within(dim: Dimension, value: Any) -> bool:
    if isinstance(dim, FloatRange):
        return dim.low <= value <= dim.high
    if isinstance(dim, IntRange):
        return dim.contains(value)
    return value in dim.values()


def _parse_data(ctx: _Ctx, d: dict[str, Any], base_dir: Path) -> DataSpec:
    info = DATASETS[d["name"]]
    img_size = d["img_size"] or info.img_size
    if info.needs_root and not d["root"]:
        raise ctx.fail(
            "data.root",
            f"is required for {d['name']}: the local folder holding {info.root_holds} (nothing is downloaded)",
        )
    if not info.needs_root and d["root"]:
        raise ctx.fail("data.root", f"{d['name']} {info.root_holds} and takes no root; remove the key")
    num_classes = info.num_classes
    if num_classes is None:
        if d["num_classes"] is None:
            raise ctx.fail("data.num_classes", f"is required for {d['name']} (the number of class folders)")
        num_classes = d["num_classes"]
    elif d["num_classes"] not in (None, num_classes):
        raise ctx.fail("data.num_classes", f"{d['name']} has {num_classes} classes, got {d['num_classes']}")
    root = str((base_dir / os.path.expanduser(d["root"])).resolve()) if d["root"] else None
    return DataSpec(
        name=d["name"],
        img_size=img_size,
        root=root,
        num_classes=num_classes,
        val_fraction=d["val_fraction"],
        augment=d["augment"],
        test_fraction=d["test_fraction"],
    )


def _parse_teacher(ctx: _Ctx, t: dict[str, Any], base_dir: Path) -> TeacherSpec:
    if t["checkpoint"] and t["pretrained"]:
        raise ctx.fail("teacher", "give either checkpoint or pretrained: true, not both")
    builtin = t["model"].startswith("kdsearch/")
    if builtin and t["model"] != BUILTIN_TEACHER:
        raise ctx.fail("teacher.model", f"unknown built-in teacher {t['model']!r}; the built-in is {BUILTIN_TEACHER}")
    if not builtin and not t["checkpoint"] and not t["pretrained"]:
        raise ctx.fail("teacher", f"timm model {t['model']!r} needs a checkpoint path or pretrained: true")
    if builtin and t["pretrained"]:
        raise ctx.fail(
            "teacher.pretrained", "the built-in teacher has no pretrained weights; give a checkpoint or leave it out"
        )
    checkpoint = str((base_dir / os.path.expanduser(t["checkpoint"])).resolve()) if t["checkpoint"] else None
    return TeacherSpec(model=t["model"], checkpoint=checkpoint, pretrained=t["pretrained"], cache_topk=t["cache_topk"])


def _parse_objectives(ctx: _Ctx, body: Any) -> tuple[tuple[str, str], ...]:
    if body is None:
        return DEFAULT_OBJECTIVES
    if not isinstance(body, dict) or not body:
        raise ctx.fail(
            "objectives",
            f"must be a non-empty mapping of metric: max|min, e.g. {{val_acc: max, flops: min}}, got {body!r}",
        )
    out = []
    for metric, mode in body.items():
        if metric not in OBJECTIVES:
            raise ctx.fail(f"objectives.{metric}", f"unknown metric; allowed: {', '.join(OBJECTIVES)}")
        if mode not in MODES:
            raise ctx.fail(f"objectives.{metric}", f"mode must be max or min, got {mode!r}")
        out.append((metric, mode))
    return tuple(out)


def _parse_hypervolume(ctx: _Ctx, body: Any, modes: dict[str, str]) -> dict[str, float]:
    """`hypervolume: {reference: {metric: value}}`: the reference point as stated, each value
    worse than the objective's ideal (so the box from one to the other is not empty)."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ctx.fail("hypervolume", f"must be a mapping holding reference: {{metric: value}}, got {_type(body)}")
    _no_unknown(ctx, "hypervolume", body, ("reference",))
    stated = body.get("reference")
    if stated is None:
        return {}
    if not isinstance(stated, dict):
        raise ctx.fail(
            "hypervolume.reference",
            f"must be a mapping of metric: value, e.g. {{val_acc: 0.0, flops: 2.0e8}}, got {_type(stated)}",
        )
    out = {}
    for metric, value in stated.items():
        key = f"hypervolume.reference.{metric}"
        if metric not in OBJECTIVES:
            raise ctx.fail(key, f"unknown metric; allowed: {', '.join(OBJECTIVES)}")
        value = _check_scalar(ctx, key, value, Key("float"))
        mode = modes.get(metric, OBJECTIVES[metric].mode)
        ideal = OBJECTIVES[metric].ideal_value(mode)
        if ideal is not None and (value >= ideal if mode == "max" else value <= ideal):
            side = "below" if mode == "max" else "above"
            raise ctx.fail(key, f"must be {side} the ideal {ideal:g} of the {mode}imized {metric}, got {value:g}")
        out[metric] = value
    return out


# ---- dimensions -----------------------------------------------------------------------

_RANGE_KEYS = ("low", "high", "step", "log", "default")
_CHOICE_KEYS = ("choices", "default")


def _parse_dimension(ctx: _Ctx, key: str, value: Any, spec: Key) -> Dimension:
    if isinstance(value, list):
        return _parse_choice(ctx, key, value, None, spec)
    if not isinstance(value, dict):
        return Fixed(_check_scalar(ctx, key, value, spec))
    if "choices" in value:
        _no_unknown(ctx, key, value, _CHOICE_KEYS)
        if not isinstance(value["choices"], list):
            raise ctx.fail(f"{key}.choices", f"must be a list, got {_type(value['choices'])}")
        return _parse_choice(ctx, key, value["choices"], value.get("default"), spec)
    if "low" in value or "high" in value:
        _no_unknown(ctx, key, value, _RANGE_KEYS)
        return _parse_range(ctx, key, value, spec)
    raise ctx.fail(
        key, "a mapping must hold either choices: [...] or low: and high: (with optional step, log, default)"
    )


def _parse_choice(ctx: _Ctx, key: str, items: list, default: Any, spec: Key) -> Choice:
    if not items:
        raise ctx.fail(key, "empty choice list; give at least one value")
    choices = tuple(_check_scalar(ctx, f"{key}[{i}]", v, spec) for i, v in enumerate(items))
    dupes = sorted({repr(c) for c in choices if choices.count(c) > 1})
    if dupes:
        raise ctx.fail(key, f"duplicate choice {', '.join(dupes)}")
    if default is not None:
        default = _check_scalar(ctx, f"{key}.default", default, spec)
        if default not in choices:
            raise ctx.fail(f"{key}.default", f"{default!r} is not one of the choices {list(choices)}")
    return Choice(choices, default)


def _parse_range(ctx: _Ctx, key: str, value: dict, spec: Key) -> Dimension:
    if spec.kind not in ("int", "float"):
        raise ctx.fail(key, f"a {spec.kind} value cannot be a range; use a choice list")
    for end in ("low", "high"):
        if end not in value:
            raise ctx.fail(key, f"a range needs both low and high; {end} is missing")
    low = _check_scalar(ctx, f"{key}.low", value["low"], spec)
    high = _check_scalar(ctx, f"{key}.high", value["high"], spec)
    if low > high:
        raise ctx.fail(key, f"low {low} is greater than high {high}")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ctx.fail(f"{key}.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise ctx.fail(f"{key}.log", f"a log range needs low > 0, got {low}")
    step = value.get("step")
    if step is not None:
        step = _check_scalar(ctx, f"{key}.step", step, Key(spec.kind, check=_gt(0), allowed="a number > 0"))
        if log:
            raise ctx.fail(key, "step and log cannot be used together (Optuna does not support it)")
    if step is not None or spec.kind == "int":  # a grid, listed whole by Dimension.values()
        count = (high - low) / (step or 1) + 1
        if not count <= MAX_RANGE_VALUES:
            raise ctx.fail(
                key, f"the range holds {count:,.0f} values, more than {MAX_RANGE_VALUES:,}; use a larger step"
            )
    if step is not None:
        if (
            spec.kind == "float"
            and not math.isclose(((high - low) / step) % 1, 0, abs_tol=1e-9)
            and not math.isclose(((high - low) / step) % 1, 1, abs_tol=1e-9)
        ):
            raise ctx.fail(f"{key}.step", f"(high - low) = {high - low} is not a multiple of step {step}")
        if spec.kind == "int" and (high - low) % step:
            raise ctx.fail(f"{key}.step", f"(high - low) = {high - low} is not a multiple of step {step}")
    default = value.get("default")
    if default is not None:
        default = _check_scalar(ctx, f"{key}.default", default, spec)
        if not low <= default <= high:
            raise ctx.fail(f"{key}.default", f"{default} is outside [{low}, {high}]")
    if spec.kind == "int":
        dim = IntRange(low, high, step or 1, log, default)
        if default is not None and not dim.contains(default):
            raise ctx.fail(f"{key}.default", f"{default} is not on the range's step grid")
        return dim
    return FloatRange(low, high, step, log, default)


def _check_scalar(ctx: _Ctx, key: str, value: Any, spec: Key) -> Any:
    """One value of the key's type that passes its check; ints are accepted for floats."""
    if value is None:
        if spec.optional:
            return None
        raise ctx.fail(key, f"must be {spec.allowed or 'a ' + spec.kind}, got null")
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
        raise ctx.fail(key, f"must be {want}, got {value!r} ({_type(value)})")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_BOUND <= value < INT_BOUND:
        raise ctx.fail(key, f"must be {spec.allowed or 'a ' + kind} and below 2**63 (64 bits), got {_digits(value)}")
    if spec.check is not None and not spec.check(value):
        raise ctx.fail(key, f"must be {spec.allowed}, got {value!r}")
    return value


def _no_unknown(ctx: _Ctx, where: str, body: dict, allowed: tuple[str, ...]) -> None:
    for k in body:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            key = f"{where}.{k}" if where else str(k)
            raise ctx.fail(key, f"unknown key{hint}; allowed: {', '.join(allowed)}")


def _digits(value: int) -> str:
    """A huge integer, said without printing all of it."""
    return f"an integer of {value.bit_length():,} bits" if abs(value) >= 10**30 else str(value)


def _type(v: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "text",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(v), type(v).__name__)


# ---- consistency across dimensions ----------------------------------------------------


def _check_student(ctx: _Ctx, dims: dict[str, Dimension], data: DataSpec) -> None:
    """Every combination the student dimensions hold must build (`StudentSpec.problems`, the
    one statement of the rules); the first that does not is named with its key.

    The rules tie width, heads and encoding together (divisibility, rope, sincos), and each of
    patch size and MLP ratio to the width alone, so every (width, heads, encoding) is checked,
    then every patch size and MLP ratio beside one of them: every combination, at the cost of
    their sum rather than their product.
    """
    has_embed, has_head = "student.embed_dim" in dims, "student.head_dim" in dims
    if has_embed == has_head:
        raise ctx.fail(
            "student",
            "give exactly one of embed_dim or head_dim (head_dim x num_heads makes embed_dim, so they cannot disagree)",
        )
    width_key = "student.embed_dim" if has_embed else "student.head_dim"
    heads = dims["student.num_heads"].values()
    patches, ratios, pes = (dims[f"student.{k}"].values() for k in ("patch_size", "mlp_ratio", "pos_embed"))
    checks = len(dims[width_key].values()) * len(heads) * len(pes)
    if checks > MAX_STUDENT_CHECKS:
        raise ctx.fail(
            "student",
            f"holds {checks:,} (width, num_heads, pos_embed) combinations; at most {MAX_STUDENT_CHECKS:,} "
            "are checked, so use steps or fewer choices",
        )
    widths = [(w if has_embed else w * h, h) for w in dims[width_key].values() for h in heads]  # (embed_dim, num_heads)
    base = StudentSpec(img_size=data.img_size, patch_size=patches[0], mlp_ratio=max(ratios))
    narrowest = min(widths)
    candidates = itertools.chain(
        (
            dataclasses.replace(base, embed_dim=d, num_heads=h, pos_embed=pe)
            for (d, h), pe in itertools.product(widths, pes)
        ),
        (dataclasses.replace(base, embed_dim=widths[0][0], num_heads=widths[0][1], patch_size=p) for p in patches),
        (dataclasses.replace(base, embed_dim=narrowest[0], num_heads=narrowest[1], mlp_ratio=r) for r in ratios),
    )
    hints = {
        "divisible by num_heads": "; every embed_dim must be divisible by every num_heads choice (or search head_dim instead of embed_dim)",
        "divide the image size": " (data.img_size)",
    }
    for student in candidates:
        for problem in student.problems():
            key = width_key if problem.field == "embed_dim" else f"student.{problem.field}"
            raise ctx.fail(key, problem.detail + "".join(h for k, h in hints.items() if k in problem.detail))


def _check_budget_meetable(ctx: _Ctx, space: SearchSpace) -> None:
    b = space.budget
    if b.max_gflops is None and b.max_params is None:
        return
    best_flops = best_params = math.inf
    for student in iter_architectures(space):
        if b.feasible(student):
            return
        fc = count_flops(student)
        best_flops, best_params = min(best_flops, fc.flops), min(best_params, fc.params)
    if b.max_gflops is not None and best_flops > b.max_gflops * 1e9:
        raise ctx.fail(
            "budget.max_gflops",
            f"{b.max_gflops:g} GFLOPs is below the cheapest student this space holds ({best_flops / 1e9:.4g} GFLOPs); "
            "raise the budget or allow smaller students",
        )
    if b.max_params is not None and best_params > b.max_params:
        raise ctx.fail(
            "budget.max_params",
            f"{b.max_params:,} params is below the smallest student this space holds ({best_params:,}); "
            "raise the budget or allow smaller students",
        )
    raise ctx.fail("budget", "no student in this space meets both max_gflops and max_params at once")


# --------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """One value as a space file would read it (YAML 1.2 numbers: `1e-3` is a float)."""
    return yaml.load(text, Loader=_Loader)


def parse_sets(space: SearchSpace, items: list[str]) -> dict[str, Any]:
    """`["student.depth=4", "recipe.alpha=0.5"]` -> {"student.depth": 4, "recipe.alpha": 0.5}:
    each key a dimension of `space`, each value of its key's type; SpaceError otherwise."""
    ctx = _Ctx(space.source)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ctx.fail("--set", f"{item!r}: expected KEY=VALUE, e.g. --set student.depth=4")
        if key not in space.dims:
            raise ctx.fail(key, f"is not a dimension of this space; known: {', '.join(space.dims)}")
        try:
            value = parse_value(text)
        except yaml.YAMLError:
            raise ctx.fail(key, f"--set {item}: {text!r} is not a value") from None
        section, _, name = key.partition(".")
        out[key] = _check_scalar(ctx, key, value, _value(SEARCHABLE[section][name]))
    return out
