"""Bad input, generated: every space file and every CLI argument list ends in success or one
line `kdsearch: error: ...` with exit code 2, never a traceback.

Hypothesis draws (a) space files: random nested YAML whose keys come from the real schema
(`SEARCHABLE`, `PLAIN`, `TOP_LEVEL`) and from random text, a valid space with a few keys
replaced by random values, and raw text that may not be YAML at all; (b) argument lists for
the commands that inspect files, their option names read from the typer app itself, with
random values, missing values, unknown options, paths that do not exist, corrupt run and
student folders, numbers out of range. No case can start a search: `search` and `confirm`
only ever get a space file or a run that fails validation, and each case checks that Ray was
never started. Every bug this found is kept below as an explicit case.

The runs are derandomized (the same examples every time, so CI is stable); set
KDSEARCH_FUZZ_EXAMPLES=2000 to draw that many fresh ones by hand.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kdsearch.cli import app
from kdsearch.errors import SpaceError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.file import load_space
from kdsearch.space.objectives import OBJECTIVES
from kdsearch.space.samplers import SAMPLERS
from kdsearch.space.schema import PLAIN, SEARCHABLE, TOP_LEVEL
from kdsearch.space.specs import POS_EMBEDS
from tests.helpers import run_cli

_FRESH = int(os.environ.get("KDSEARCH_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_FRESH or 40,
    deadline=5000,  # ms per case: a validation that enumerates a huge range fails here rather than hanging
    derandomize=not _FRESH,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# A small valid space (32 students): the mutations below start from it, to reach the checks
# that only run once the rest of a file is right (the student rules, the budget, the summary).
BASE = """
name: fuzz
data: {name: digits, img_size: 16}
teacher: {model: kdsearch/digits_cnn, checkpoint: teacher.safetensors}
student:
  embed_dim: [32, 48]
  depth: {low: 1, high: 2}
  num_heads: [2, 4]
  mlp_ratio: 2.0
  patch_size: [4, 2]
  pos_embed: [learned, rope]
  distill_token: [false, true]
recipe: {alpha: {low: 0.0, high: 1.0}, temperature: {low: 1.0, high: 8.0, log: true, default: 4.0}}
train: {epochs: 2, batch_size: 64, lr: 2.0e-3}
early_stopping: {grace_epochs: 2}
budget: {max_gflops: 0.004}
search: {trials: 4, sampler: random, seed: 3, enqueue: [{student.depth: 2}]}
objectives: {val_acc: max, flops: min}
hypervolume: {reference: {val_acc: 0.0}}
"""
BASE_RAW: dict[str, Any] = yaml.safe_load(BASE)
WIDE_STUDENT = {
    **{k: v for k, v in BASE_RAW["student"].items() if k != "embed_dim"},
    "pos_embed": "learned",
    "head_dim": {"low": 1, "high": 2000},
    "num_heads": {"low": 1, "high": 4000},
}

SECTION_KEYS = {**{s: list(k) for s, k in SEARCHABLE.items()}, **{s: list(k) for s, k in PLAIN.items()}}
SECTION_KEYS["search"] = [*SECTION_KEYS["search"], "enqueue"]
SECTION_KEYS["hypervolume"] = ["reference"]
SECTION_KEYS["objectives"] = list(OBJECTIVES)
DIMENSION_KEYS = ["choices", "default", "low", "high", "step", "log"]
REAL_KEYS = sorted(
    {*TOP_LEVEL, *DIMENSION_KEYS, *(k for keys in SECTION_KEYS.values() for k in keys)}
    | {f"{s}.{k}" for s in SEARCHABLE for k in SEARCHABLE[s]}
)
WORDS = [*POS_EMBEDS, *DATASETS, *SAMPLERS, "kdsearch/digits_cnn", "max", "min", "", " ", "~", "../x", "a\0b"]

ints = st.one_of(
    st.integers(-10, 100),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63) - 1, 10**400]),
)
floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, 1.7e308]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=10), st.integers(-3, 3), st.booleans())
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=20
)
dimension = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.sampled_from(DIMENSION_KEYS) | st.text(max_size=5), scalars | st.lists(scalars, max_size=3)),
)


@st.composite
def shaped(draw: st.DrawFn) -> dict:
    """Sections of the real schema, each a mapping of its real keys (and stray ones) to values."""
    out = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=6, unique=True)):
        names = st.sampled_from(SECTION_KEYS[section]) | st.text(max_size=6)
        out[section] = draw(st.one_of(st.dictionaries(names, dimension, max_size=5), values))
    if draw(st.booleans()):
        out["name"] = draw(scalars)
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict:
    """The valid BASE with one to three keys replaced, removed or added."""
    raw = yaml.safe_load(BASE)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(SECTION_KEYS)))
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            body = raw[section] = {}
        key = draw(st.sampled_from(SECTION_KEYS[section]) | st.text(max_size=6))
        action = draw(st.sampled_from(["set", "set", "delete", "section"]))
        if action == "delete":
            body.pop(key, None)
        elif action == "section":
            raw[section] = draw(values)
        else:
            body[key] = draw(dimension)
    return raw


documents = st.one_of(mutated(), shaped(), values)
TOKENS = [
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "!!",
    "&a ",
    "*a",
    "? ",
    "%YAML 1.1\n",
    "---\n",
    "\t",
    "\n",
    "  ",
    "'",
    '"',
]
raw_texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=30).map("".join),
    st.sampled_from(REAL_KEYS).map(lambda k: f"{k}: ") | st.just(BASE + "\n  !!bad"),
)


def call(argv: list[str]) -> tuple[int, str, str]:
    """Run `kdsearch ARGV` in this process; its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(err: str) -> None:
    lines = err.splitlines()  # every line break Python knows, \r and \u2028 included
    assert len(lines) == 1 and lines[0].startswith("kdsearch: error: "), err
    assert "Traceback" not in err


def ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def check_space_file(path: Path) -> None:
    """load_space either succeeds or raises SpaceError; `space show` exits 0, or 2 with that one line."""
    try:
        load_space(path)
        raised = None
    except SpaceError as e:
        raised = e
    code, out, err = call(["space", "show", "--samples", "50", str(path)])
    if raised is None:
        assert code == 0, err
        assert out and err == ""
    else:
        assert code == 2 and out == ""
        assert_one_line_error(err)
        assert err.strip() == " ".join(f"kdsearch: error: {raised}".splitlines())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


# ---- (a) space files -----------------------------------------------------------------


def test_base_space_is_valid(folder: Path) -> None:
    """The mutations start from a space that loads, so what they break is what they changed."""
    path = folder / "base.yaml"
    path.write_text(BASE)
    assert load_space(path).name == "fuzz"


@FUZZ
@given(doc=documents)
@example(doc={**BASE_RAW, "train": {"lr": 10**400}})  # an int too large for a float: OverflowError
@example(doc={**BASE_RAW, "data": {"name": "digits", "img_size": 10**200}, "budget": {}})  # FLOPs past a float
@example(doc={**BASE_RAW, "student": {**BASE_RAW["student"], "depth": {"low": 1, "high": 10**11}}})  # MemoryError
@example(doc={**BASE_RAW, "recipe": {"alpha": {"low": 0.0, "high": 1.0, "step": 1e-9}}})  # 10**9 values listed
@example(doc={**BASE_RAW, "teacher": {"model": "kdsearch/digits_cnn", "checkpoint": "a\0b"}})  # ValueError: NUL
@example(doc={**BASE_RAW, "student": {**BASE_RAW["student"], "mlp_ratio": 1.7e308}, "budget": {}})  # int(inf)
@example(doc={**BASE_RAW, "search": {"seed": -1}})  # Optuna's samplers take 0 .. 2**32 - 1 only
@example(doc={**BASE_RAW, "train": {"seed": 2**40}})  # torch's generator overflows at seed x 100,003
@example(doc={**BASE_RAW, "student": WIDE_STUDENT, "budget": {}})  # 8M (width, heads, encoding) checks
@example(doc={**BASE_RAW, "student": {**BASE_RAW["student"], "embed_dim": None}})  # TypeError: None < 1
@example(doc={**BASE_RAW, "student": {**BASE_RAW["student"], "embed_dim": [None, 32]}})
@example(doc={**BASE_RAW, "search": {"enqueue": [{"student.embed_dim": None}]}})
def test_space_documents(folder: Path, doc: Any) -> None:
    path = folder / "doc.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    check_space_file(path)


@FUZZ
@given(text=raw_texts)
@example(text="[" * 5000)  # RecursionError inside PyYAML's composer
@example(text="a: " + "{a: " * 3000 + "1" + "}" * 3000)
@example(text="name: " + "9" * 5000)  # ValueError: past Python's 4,300-digit int conversion limit
@example(text="search: {seed: 2001-13-45}")  # ValueError: month must be in 1..12
@example(text="name: !!float abc")  # ValueError from PyYAML's float constructor
@example(text="budget: {\u2028: 1}")  # a key with a line break: the error took two lines
def test_space_texts(folder: Path, text: str) -> None:
    path = folder / "text.yaml"
    path.write_text(text, encoding="utf-8")
    check_space_file(path)


@FUZZ
@given(data=st.binary(max_size=64))
@example(data=b"\xff\xfe\x00name")  # not UTF-8
def test_space_bytes(folder: Path, data: bytes) -> None:
    path = folder / "bytes.yaml"
    path.write_bytes(data)
    check_space_file(path)


# ---- (b) argument lists --------------------------------------------------------------

ROOT = typer.main.get_command(app)
# the commands that read files and never start Ray on the inputs below (search and confirm only
# get spaces and runs that fail validation first)
COMMANDS = {
    ("space", "show"): ROOT.commands["space"].commands["show"],
    **{(name,): ROOT.commands[name] for name in ("status", "pareto", "report", "export", "eval", "measure", "confirm")},
    ("search",): ROOT.commands["search"],
}


@pytest.fixture(scope="module")
def paths(folder: Path) -> dict[str, list[str]]:
    """Bad files of each kind: runs, students, spaces, output paths (none of them valid input)."""
    bad_runs = []
    for i, (meta, trials) in enumerate(
        [
            (None, None),  # an empty folder
            ("{", None),  # run.json not JSON
            ("[]", None),  # run.json not an object
            ('{"objectives": 5, "trials": "x"}', None),
            ('{"objectives": [["val_acc", "max"]]}', b"PAR1 garbage"),  # trials.parquet corrupt
            (None, b""),  # an empty trials.parquet
        ]
    ):
        run = folder / f"run{i}"
        run.mkdir()
        if meta is not None:
            (run / "run.json").write_text(meta)
        if trials is not None:
            (run / "trials.parquet").write_bytes(trials)
        bad_runs.append(str(run))
    bad_students = []
    for i, card in enumerate(["{", "[]", "{}", "student: 3", "student: {depth: x}\nmetrics: {}", "\xff"]):
        student = folder / f"student{i}"
        student.mkdir()
        (student / "student.yaml").write_text(card)
        bad_students.append(str(student))
    spaces = []
    for i, text in enumerate(["[", "student: {depth: 0}", "!!python/object/apply:os.getcwd []", ""]):
        space = folder / f"space{i}.yaml"
        space.write_text(text)
        spaces.append(str(space))
    # no s3:// here: the AWS SDK would try the network (and retry for seconds)
    missing = [str(folder / "missing"), str(folder / "missing" / "deeper.yaml"), "", "nope://x", "\0"]
    return {"run": bad_runs + missing, "student": bad_students + missing, "space": spaces + missing[:3]}


def _value(draw: st.DrawFn, param: Any, paths: dict[str, list[str]], folder: Path) -> list[str]:
    """One option's arguments: a plausible value, a random one, or none at all."""
    kind = param.type_descriptor.annotation
    kind = getattr(kind, "__name__", str(kind))
    plausible: st.SearchStrategy[str]
    if kind == "int":
        plausible = st.integers(-3, 5).map(str) | st.sampled_from(["2147483648", "9" * 30, "-0", "1.5", "0x10"])
    elif kind == "float":
        plausible = st.floats().map(str) | st.sampled_from(["nan", "-inf", "1e400", "0", "-1", "x"])
    elif kind == "Path" and param.name in ("out", "html_out", "plot"):
        plausible = st.sampled_from([str(folder / "out" / "x"), str(folder), str(folder / "base.yaml")])
    elif kind == "str" and param.name in ("data",):
        plausible = st.sampled_from([*paths["space"], *DATASETS, "imagefolder"])
    elif kind == "str" and param.name in ("from_run",):
        plausible = st.sampled_from(paths["run"])
    elif kind == "str" and param.name == "objectives":
        words = st.sampled_from([*OBJECTIVES, "val_acc:max", "flops:min", "x:y", ":", ""])
        plausible = st.lists(words, max_size=3).map(",".join)
    elif hasattr(param.type_descriptor.annotation, "__members__"):  # an Enum
        plausible = st.sampled_from([*param.type_descriptor.annotation.__members__, "TABLE", ""])
    else:
        plausible = st.sampled_from(["", "x", "auto", "ray://127.0.0.1:1", "nope://x", str(folder / "nope")])
    if getattr(param, "is_flag", False):
        return [param.opts[0]]
    choice = draw(st.sampled_from(["plausible", "plausible", "random", "missing"]))
    if choice == "missing":
        return [param.opts[0]]
    value = draw(plausible) if choice == "plausible" else draw(st.text(max_size=8))
    return [param.opts[0], value]


@st.composite
def argv(draw: st.DrawFn, paths: dict[str, list[str]], folder: Path) -> list[str]:
    path, command = draw(st.sampled_from(sorted(COMMANDS.items())))
    args: list[str] = []
    for param in command.params:
        if param.opts[0].startswith("-"):
            if draw(st.integers(0, 2)) == 0:
                args += _value(draw, param, paths, folder)
            continue
        if draw(st.integers(0, 9)) == 0:
            continue  # the argument missing
        kind = "space" if path in (("space", "show"), ("search",)) else "student" if path == ("eval",) else "run"
        args.append(draw(st.sampled_from(paths[kind]) | (st.text(max_size=6) if kind != "space" else st.nothing())))
    if draw(st.integers(0, 4)) == 0:
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(["--bogus", "-x", "--", "--help=1"])))
    return [*path, *args]


def test_commands_are_all_known() -> None:
    """The fuzz covers the inspecting commands by their real names and options."""
    assert {p[-1] for p in COMMANDS} == {
        "show",
        "status",
        "pareto",
        "report",
        "export",
        "eval",
        "measure",
        "confirm",
        "search",
    }
    assert all(command.params for command in COMMANDS.values())


@pytest.mark.parametrize(
    "args",
    [
        ["status", "\0"],  # ValueError: embedded null byte
        ["status", "RUN1"],  # run.json not JSON: JSONDecodeError
        ["pareto", "RUN3"],  # run.json's objectives not pairs: TypeError
        ["status", "RUN5"],  # no run.json: KeyError 'objectives'
        ["export", "RUN4", "--out", "OUT", "--trial", "x"],  # trials.parquet corrupt: ArrowInvalid
        ["eval", "STUDENT0"],  # student.yaml not YAML: ParserError
        ["eval", "STUDENT2"],  # student.yaml without its sections: KeyError
        ["eval", "STUDENT4"],  # a student of the wrong types: TypeError
        ["eval", "\r"],  # the echoed path broke the line in two
        ["status", "a\u2028b"],
    ],
)
def test_argument_regressions(paths: dict[str, list[str]], folder: Path, args: list[str]) -> None:
    """Each a traceback once; now one line and exit code 2."""
    names = {"BASE": str(folder / "base.yaml"), "OUT": str(folder / "out" / "x")}
    names |= {f"RUN{i}": p for i, p in enumerate(paths["run"][:6])}
    names |= {f"STUDENT{i}": p for i, p in enumerate(paths["student"][:6])}
    (folder / "base.yaml").write_text(BASE)
    code, out, err = call([names.get(a, a) for a in args])
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert not (folder / "out").exists()


def test_samples_out_of_range(folder: Path) -> None:
    """`space show --samples 0` divided by zero; now a usage error (typer's, exit code 2)."""
    (folder / "base.yaml").write_text(BASE)
    code, out, err = call(["space", "show", "--samples", "0", str(folder / "base.yaml")])
    assert code == 2 and "Invalid value for '--samples'" in err and "Traceback" not in err


@FUZZ
@given(data=st.data())
def test_argument_lists(paths: dict[str, list[str]], folder: Path, data: st.DataObject) -> None:
    args = data.draw(argv(paths, folder))
    code, out, err = call(args)
    print(args)  # shown with the failure
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in err
    if code == 2 and err.startswith("kdsearch: error: "):
        assert_one_line_error(err)
    assert not ray_started(), args
    assert not (folder / "out").exists(), args  # nothing was exported or reported from a bad run
