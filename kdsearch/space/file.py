"""The search-space file: reading it, validating it, and making a `SearchSpace` of it.

A space file names the data, the teacher, the student dimensions, the distillation recipe,
the training settings, the objectives, the budgets, per-trial resources and the sampler.
Every value under `student`, `recipe` and `train` may be searched (how a searched value is
written: kdsearch.space.dimension_syntax); every other section holds one value per key.

Every section's keys, their types, defaults and allowed values are the `setting` fields of
the dataclass it builds (kdsearch.space.schema reads them). Everything is validated when the
file is loaded, for every combination the space holds: a bad file raises `SpaceError` naming
the file, the key and what is allowed, and no sampled config can be inconsistent (the student
rules are `StudentSpec.problems`). The result is a `kdsearch.space.search_space.SearchSpace`;
`parse_sets` checks `--set key=value` overrides against the same schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from kdsearch.errors import SpaceError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.dimension_syntax import parse_dimension, within
from kdsearch.space.dimensions import Dimension, Fixed
from kdsearch.space.flops import count_flops
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, MODES, OBJECTIVES
from kdsearch.space.schema import (
    PLAIN,
    SEARCHABLE,
    TOP_LEVEL,
    Key,
    check_scalar,
    no_unknown,
    type_name,
    value_key,
)
from kdsearch.space.search_space import (
    Budget,
    EarlyStopping,
    Resources,
    SearchSettings,
    SearchSpace,
    check_strategy,
    iter_architectures,
)
from kdsearch.space.specs import BUILTIN_TEACHER, DataSpec, StudentSpec, TeacherSpec
from kdsearch.space.yaml_loader import parse_value, read_yaml

MAX_STUDENT_CHECKS = 100_000  # (width, num_heads, pos_embed) combinations `_check_student` tries


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and validate a space file. Raises `SpaceError` (one clear line) on any problem."""
    p = Path(path)
    source = str(path)
    if not p.is_file():
        raise SpaceError(source, "", "no such file" if not p.exists() else "is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(source, "", f"cannot read: {e}") from None
    return parse_space_text(text, source=source, base_dir=p.resolve().parent)


def parse_space_text(text: str, source: str = "<space>", base_dir: Path | None = None) -> SearchSpace:
    """Read and validate a space file's text (a run's stored space.yaml); relative paths in it
    resolve against `base_dir`."""
    return parse_space(read_yaml(text, source), source=source, base_dir=base_dir)


def parse_space(raw: Any, source: str = "<space>", base_dir: Path | None = None) -> SearchSpace:
    """Validate an already-parsed mapping (what `load_space` does after reading YAML).

    Args:
        raw: The file's content as YAML read it.
        source: The file, named by every error.
        base_dir: What relative paths (data.root, teacher.checkpoint) resolve against; the
            working directory when None.

    Returns:
        The validated space.

    Raises:
        SpaceError: The first problem found, in one line naming the file and the key.
    """
    base_dir = base_dir or Path.cwd()
    name, description = _parse_header(source, raw)
    search_body = raw.get("search")
    enqueue = search_body.get("enqueue") if isinstance(search_body, dict) else None
    track = search_body.get("track") if isinstance(search_body, dict) else None
    if isinstance(search_body, dict):  # enqueue (a list of configs) and track (of names) are no scalar keys
        search_body = {k: v for k, v in search_body.items() if k not in ("enqueue", "track")}
    plain = {
        section: _parse_plain(source, section, search_body if section == "search" else raw.get(section))
        for section in PLAIN
    }
    data = _parse_data(source, plain["data"], base_dir)
    teacher = _parse_teacher(source, plain["teacher"], base_dir)
    dims = _parse_dims(source, raw)
    _check_student(source, dims, data)
    if teacher.model == BUILTIN_TEACHER and max(dims["recipe.attention_weight"].values()) > 0:
        raise SpaceError(
            source,
            "recipe.attention_weight",
            f"the teacher {BUILTIN_TEACHER} is a CNN with no attention maps; keep it 0",
        )
    objectives = _parse_objectives(source, raw.get("objectives"))
    reference = _parse_hypervolume(source, raw.get("hypervolume"), dict(objectives))
    plain["search"]["track"] = _parse_track(source, track)
    search = SearchSettings(**plain["search"], enqueue=_parse_enqueue(source, enqueue, dims))
    space = SearchSpace(
        name=name,
        source=source,
        dims=dims,
        data=data,
        teacher=teacher,
        objectives=objectives,
        budget=Budget(**plain["budget"]),
        resources=Resources(**plain["resources"]),
        search=search,
        early_stopping=EarlyStopping(**plain["early_stopping"]),
        description=description,
        reference=reference,
        raw=raw,
    )
    _check_budget_meetable(source, space)
    check_strategy(space)
    return space


# ---- sections -------------------------------------------------------------------------


def _parse_header(source: str, raw: Any) -> tuple[str, str]:
    """The file is a mapping of known sections holding a student; its name and description."""
    if raw is None:
        raise SpaceError(source, "", "is empty; a space needs at least a student section")
    if not isinstance(raw, dict):
        raise SpaceError(source, "", f"must be a mapping of sections ({', '.join(TOP_LEVEL)}), got {type_name(raw)}")
    no_unknown(source, "", raw, TOP_LEVEL)
    if "student" not in raw:
        raise SpaceError(source, "student", "is missing; a space needs a student section")
    name = raw.get("name", re.sub(r"[^A-Za-z0-9_.-]", "", Path(source).stem) or "space")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpaceError(source, "name", f"must be a word of letters, digits, '_', '-' or '.', got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpaceError(source, "description", f"must be text, got {type_name(description)}")
    return name, description


def _section_body(source: str, section: str, body: Any, keys: dict[str, Key]) -> dict:
    """A section's mapping (empty when left out or null) holding only its keys."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise SpaceError(source, section, f"must be a mapping of keys ({', '.join(keys)}), got {type_name(body)}")
    no_unknown(source, section, body, tuple(keys))
    return body


def _parse_plain(source: str, section: str, body: Any) -> dict[str, Any]:
    """A plain section's value for each of its keys, its default where the file leaves it out."""
    keys = PLAIN[section]
    body = _section_body(source, section, body, keys)
    return {
        name: check_scalar(source, f"{section}.{name}", body[name], spec) if name in body else spec.default
        for name, spec in keys.items()
    }


def _parse_dims(source: str, raw: dict) -> dict[str, Dimension]:
    """The dimension of every searchable key (a key left out is fixed at its default)."""
    dims: dict[str, Dimension] = {}
    for section, keys in SEARCHABLE.items():
        body = _section_body(source, section, raw.get(section, {}), keys)
        for name, spec in keys.items():
            key = f"{section}.{name}"
            if name in body and not (spec.optional and body[name] is None):  # null: an optional key left out
                dims[key] = parse_dimension(source, key, body[name], value_key(spec))
            elif spec.default is not None:
                dims[key] = Fixed(spec.default)
    return dims


def _parse_track(source: str, value: Any) -> tuple[str, ...]:
    """`search.track`: the trackers each trial is logged to, a list of names or one name (null: none)."""
    spec, names = PLAIN["search"]["track"], [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not spec.check(names):
        raise SpaceError(source, "search.track", f"must be {spec.allowed}, got {value!r} ({type_name(value)})")
    return tuple(dict.fromkeys(names))


def _parse_enqueue(source: str, items: Any, dims: dict[str, Dimension]) -> tuple[dict[str, Any], ...]:
    """`search.enqueue`: configs the search tries first, in order (Optuna's enqueue_trial), each a
    mapping of dotted dimension names to values, e.g. {student.embed_dim: 192, student.depth: 12};
    the dimensions a config leaves out are sampled. Every key must be a dimension of the space and
    every value one it allows."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise SpaceError(
            source, "search.enqueue", f"must be a list of configs ({{student.depth: 4, ...}}), got {type_name(items)}"
        )
    out = []
    for i, config in enumerate(items):
        where = f"search.enqueue[{i}]"
        if not isinstance(config, dict) or not config:
            raise SpaceError(source, where, f"must be a mapping of dimension names to values, got {type_name(config)}")
        for key, value in config.items():
            if key not in dims:
                near = difflib.get_close_matches(str(key), list(dims), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise SpaceError(
                    source, f"{where}.{key}", f"is not a dimension of this space{hint}; known: {', '.join(dims)}"
                )
            section, _, name = key.partition(".")
            value = check_scalar(source, f"{where}.{key}", value, value_key(SEARCHABLE[section][name]))
            dim = dims[key]
            if not within(dim, value):
                raise SpaceError(source, f"{where}.{key}", f"{value!r} is not in the space: {dim.describe()}")
            config[key] = value
        out.append(dict(config))
    return tuple(out)


def _parse_data(source: str, d: dict[str, Any], base_dir: Path) -> DataSpec:
    """The data section's values, checked against the dataset's table row: its image size where
    the file gives none, its root made absolute, its number of classes."""
    info = DATASETS[d["name"]]
    img_size = d["img_size"] or info.img_size
    if info.needs_root and not d["root"]:
        raise SpaceError(
            source,
            "data.root",
            f"is required for {d['name']}: the local folder holding {info.root_holds} (only datasets with a public archive are fetched)",
        )
    if not info.needs_root and info.archive is None and d["root"]:  # an archive's root is where it is fetched to
        raise SpaceError(source, "data.root", f"{d['name']} {info.root_holds} and takes no root; remove the key")
    num_classes = info.num_classes
    if num_classes is None:
        if d["num_classes"] is None:
            raise SpaceError(source, "data.num_classes", f"is required for {d['name']} (the number of its classes)")
        num_classes = d["num_classes"]
    elif d["num_classes"] not in (None, num_classes):
        raise SpaceError(source, "data.num_classes", f"{d['name']} has {num_classes} classes, got {d['num_classes']}")
    root = str((base_dir / os.path.expanduser(d["root"])).resolve()) if d["root"] else None
    if d["name"] == "hf" and not d["path"]:
        raise SpaceError(source, "data.path", "is required for hf: a hub id, a save_to_disk folder, or Parquet files")
    if d["name"] != "hf" and d["path"]:
        raise SpaceError(source, "data.path", f"is read by hf only; remove it for {d['name']}")
    path, local = d["path"], base_dir / os.path.expanduser(d["path"] or ".")
    # a hub id (org/name) stays as given; a local path (/, ~, ., Parquet files, or beside the space file) is made absolute
    if path and (path.startswith(("/", "~", ".")) or path.endswith(".parquet") or "*" in path or local.exists()):
        path = str(local.resolve())
    return DataSpec(**{**d, "img_size": img_size, "root": root, "num_classes": num_classes, "path": path})


def _parse_teacher(source: str, t: dict[str, Any], base_dir: Path) -> TeacherSpec:
    """The teacher section's values: a source of weights that its model has (with both, the
    checkpoint is the teacher `kdsearch teacher finetune` makes from the pretrained weights);
    the checkpoint's and the pretrained file's paths made absolute."""
    if t["pretrained_file"] and not t["pretrained"]:
        raise SpaceError(
            source, "teacher.pretrained_file", "names the pretrained weights' file: set pretrained: true with it"
        )
    builtin = t["model"].startswith("kdsearch/")
    if builtin and t["model"] != BUILTIN_TEACHER:
        raise SpaceError(
            source, "teacher.model", f"unknown built-in teacher {t['model']!r}; the built-in is {BUILTIN_TEACHER}"
        )
    if not builtin and not t["checkpoint"] and not t["pretrained"]:
        raise SpaceError(source, "teacher", f"timm model {t['model']!r} needs a checkpoint path or pretrained: true")
    if builtin and t["pretrained"]:
        raise SpaceError(
            source,
            "teacher.pretrained",
            "the built-in teacher has no pretrained weights; give a checkpoint or leave it out",
        )
    checkpoint, pretrained_file = (
        str((base_dir / os.path.expanduser(t[key])).resolve()) if t[key] else None
        for key in ("checkpoint", "pretrained_file")
    )
    return TeacherSpec(**{**t, "checkpoint": checkpoint, "pretrained_file": pretrained_file})


def _parse_objectives(source: str, body: Any) -> tuple[tuple[str, str], ...]:
    if body is None:
        return DEFAULT_OBJECTIVES
    if not isinstance(body, dict) or not body:
        raise SpaceError(
            source,
            "objectives",
            f"must be a non-empty mapping of metric: max|min, e.g. {{val_acc: max, flops: min}}, got {body!r}",
        )
    out = []
    for metric, mode in body.items():
        if metric not in OBJECTIVES:
            raise SpaceError(source, f"objectives.{metric}", f"unknown metric; allowed: {', '.join(OBJECTIVES)}")
        if mode not in MODES:
            raise SpaceError(source, f"objectives.{metric}", f"mode must be max or min, got {mode!r}")
        out.append((metric, mode))
    return tuple(out)


def _parse_hypervolume(source: str, body: Any, modes: dict[str, str]) -> dict[str, float]:
    """`hypervolume: {reference: {metric: value}}`: the reference point as stated, each value
    worse than the objective's ideal (so the box from one to the other is not empty)."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise SpaceError(
            source, "hypervolume", f"must be a mapping holding reference: {{metric: value}}, got {type_name(body)}"
        )
    no_unknown(source, "hypervolume", body, ("reference",))
    stated = body.get("reference")
    if stated is None:
        return {}
    if not isinstance(stated, dict):
        raise SpaceError(
            source,
            "hypervolume.reference",
            f"must be a mapping of metric: value, e.g. {{val_acc: 0.0, flops: 2.0e8}}, got {type_name(stated)}",
        )
    out = {}
    for metric, value in stated.items():
        key = f"hypervolume.reference.{metric}"
        if metric not in OBJECTIVES:
            raise SpaceError(source, key, f"unknown metric; allowed: {', '.join(OBJECTIVES)}")
        value = check_scalar(source, key, value, Key("float"))
        mode = modes.get(metric, OBJECTIVES[metric].mode)
        ideal = OBJECTIVES[metric].ideal_value(mode)
        if ideal is not None and (value >= ideal if mode == "max" else value <= ideal):
            side = "below" if mode == "max" else "above"
            raise SpaceError(
                source, key, f"must be {side} the ideal {ideal:g} of the {mode}imized {metric}, got {value:g}"
            )
        out[metric] = value
    return out


# ---- consistency across dimensions ----------------------------------------------------


def _check_student(source: str, dims: dict[str, Dimension], data: DataSpec) -> None:
    """Every combination the student dimensions hold must build (`StudentSpec.problems`, the
    one statement of the rules); the first that does not is named with its key.

    The rules tie width, heads and encoding together (divisibility, rope, sincos), and each of
    patch size and MLP ratio to the width alone, so every (width, heads, encoding) is checked,
    then every patch size and MLP ratio beside one of them: every combination, at the cost of
    their sum rather than their product.
    """
    has_embed, has_head = "student.embed_dim" in dims, "student.head_dim" in dims
    if has_embed == has_head:
        raise SpaceError(
            source,
            "student",
            "give exactly one of embed_dim or head_dim (head_dim x num_heads makes embed_dim, so they cannot disagree)",
        )
    width_key = "student.embed_dim" if has_embed else "student.head_dim"
    heads = dims["student.num_heads"].values()
    patches, ratios, pes = (dims[f"student.{k}"].values() for k in ("patch_size", "mlp_ratio", "pos_embed"))
    checks = len(dims[width_key].values()) * len(heads) * len(pes)
    if checks > MAX_STUDENT_CHECKS:
        raise SpaceError(
            source,
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
            raise SpaceError(source, key, problem.detail + "".join(h for k, h in hints.items() if k in problem.detail))


def _check_budget_meetable(source: str, space: SearchSpace) -> None:
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
        raise SpaceError(
            source,
            "budget.max_gflops",
            f"{b.max_gflops:g} GFLOPs is below the cheapest student this space holds ({best_flops / 1e9:.4g} GFLOPs); "
            "raise the budget or allow smaller students",
        )
    if b.max_params is not None and best_params > b.max_params:
        raise SpaceError(
            source,
            "budget.max_params",
            f"{b.max_params:,} params is below the smallest student this space holds ({best_params:,}); "
            "raise the budget or allow smaller students",
        )
    raise SpaceError(source, "budget", "no student in this space meets both max_gflops and max_params at once")


# ---- --set overrides ------------------------------------------------------------------


def parse_sets(space: SearchSpace, items: list[str]) -> dict[str, Any]:
    """`["student.depth=4", "recipe.alpha=0.5"]` -> {"student.depth": 4, "recipe.alpha": 0.5}:
    each key a dimension of `space`, each value of its key's type; SpaceError otherwise."""
    source = space.source
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpaceError(source, "--set", f"{item!r}: expected KEY=VALUE, e.g. --set student.depth=4")
        if key not in space.dims:
            raise SpaceError(source, key, f"is not a dimension of this space; known: {', '.join(space.dims)}")
        try:
            value = parse_value(text)
        except yaml.YAMLError:
            raise SpaceError(source, key, f"--set {item}: {text!r} is not a value") from None
        section, _, name = key.partition(".")
        out[key] = check_scalar(source, key, value, value_key(SEARCHABLE[section][name]))
    return out
