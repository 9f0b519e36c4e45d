"""`--where` and `--pick` (kdsearch.results.selection): the pure rule on hand-built rows and
fronts whose answers are computed here by hand, then `pareto`, `export` and `measure` on a
run folder built by hand (tiny real students, their real weights; no search)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kdsearch.errors import KdsearchError
from kdsearch.results.selection import (
    choose,
    filter_rows,
    knee,
    parse_pick,
    parse_where,
    pick_row,
    resolve_columns,
    select,
    with_measured,
)
from tests.helpers import run_cli

OBJ = [("val_acc", "max"), ("flops", "min")]


def row(tid: str, acc: float, flops: float, status: str = "completed", **extra) -> dict:
    return {"trial_id": tid, "status": status, "val_acc": acc, "flops": flops, **extra}


# t1 and t3 are equal points (both on the front); t5 is dominated by t2; t6 failed.
TRIALS = [
    row("t3", 0.9, 100, **{"student.pos_embed": "rope", "params": 5e6}),
    row("t2", 0.8, 50, **{"student.pos_embed": "learned", "params": 2e6}),
    row("t1", 0.9, 100, **{"student.pos_embed": "learned", "params": 5e6}),
    row("t4", 0.5, 10, **{"student.pos_embed": "rope", "params": 1e6}),
    row("t5", 0.7, 80, **{"student.pos_embed": "rope", "params": 3e6}),
    row("t6", None, 5, status="failed", **{"student.pos_embed": "rope", "params": 1e5}),
]


def ids(rows) -> list[str]:
    return [r["trial_id"] for r in rows]


def test_parse_where_numbers_text_and_bools() -> None:
    c = parse_where("params<2e6")
    assert (c.column, c.op, c.value) == ("params", "<", 2e6)
    assert parse_where(" latency_ms <= 5 ").value == 5.0
    assert parse_where("student.pos_embed=='rope'").value == "rope"
    assert parse_where("student.distill_token==true").value is True
    assert [parse_where(f"x{op}1").op for op in ("<=", "<", ">=", ">", "==", "!=")] == [
        "<=",
        "<",
        ">=",
        ">",
        "==",
        "!=",
    ]


@pytest.mark.parametrize("expr", ["latency_ms=<5", "val_acc", "val_acc=0.9", ">=0.9", "pos_embed<rope", "1x>=2"])
def test_a_malformed_expression_is_one_line_saying_what_is_allowed(expr: str) -> None:
    with pytest.raises(KdsearchError) as e:
        parse_where(expr)
    assert "\n" not in str(e.value) and "<=, <, >=, >, ==, !=" in str(e.value)


def test_parse_pick() -> None:
    assert (parse_pick("max:val_acc").kind, parse_pick("max:val_acc").column) == ("max", "val_acc")
    assert parse_pick("min:latency_ms").column == "latency_ms"
    assert parse_pick("knee").column is None
    for bad in ("best", "max:", "median:val_acc", "max:1x"):
        with pytest.raises(KdsearchError, match="allowed: max:COLUMN, min:COLUMN or knee"):
            parse_pick(bad)


def test_the_front_and_max_min_picks_with_ties() -> None:
    assert ids(select(TRIALS, OBJ)) == ["t4", "t2", "t1", "t3"]  # cheapest first; t5 dominated; t6 failed
    # t1 and t3 tie on val_acc and flops: the lower trial id
    assert pick_row(select(TRIALS, OBJ), parse_pick("max:val_acc"), OBJ)["trial_id"] == "t1"
    assert pick_row(select(TRIALS, OBJ), parse_pick("min:flops"), OBJ)["trial_id"] == "t4"
    # a tie on the picked column is broken by the objectives in order: equal params 5e6, t1/t3 again
    assert pick_row(select(TRIALS, OBJ), parse_pick("max:params"), OBJ)["trial_id"] == "t1"
    tied = [row("a", 0.8, 50, params=1.0), row("b", 0.9, 60, params=1.0)]  # same params: higher val_acc wins
    assert pick_row(tied, parse_pick("min:params"), OBJ)["trial_id"] == "b"
    assert pick_row([], parse_pick("knee"), OBJ) is None


def test_where_filters_the_trials_then_takes_the_front() -> None:
    # flops >= 60 leaves t3, t1 and t5; t5 (dominated by t2 before) is now on the front
    assert ids(select(TRIALS, OBJ, resolve_columns([parse_where("flops>=60")], None, TRIALS)[0])) == ["t5", "t1", "t3"]
    rows, rule = choose(TRIALS, OBJ, ["pos_embed==rope", "val_acc<0.95"], "max:val_acc")
    assert ids(rows) == ["t3"] and rule["resolved"] == ["student.pos_embed==rope", "val_acc<0.95", "pick max:val_acc"]
    assert ids(choose(TRIALS, OBJ, ["student.pos_embed!=rope"])[0]) == ["t2", "t1"]
    assert choose(TRIALS, OBJ, ["val_acc>=0.99"])[0] == []  # empty, not an error
    assert choose(TRIALS, OBJ, ["val_acc>=0.99"], "knee")[0] == []
    # a row without a value meets no constraint, != included
    assert filter_rows([row("x", None, 1), row("y", math.nan, 1)], [parse_where("val_acc!=0.5")]) == []


def test_knee_two_objectives_by_hand() -> None:
    front = select(TRIALS, OBJ)  # t4 (.5, 10), t2 (.8, 50), t1 = t3 (.9, 100)
    # normalized, 0 best: x = (0.9 - acc) / 0.4, y = (flops - 10) / 90; the knee has the smallest x + y
    sums = {"t4": 1.0 + 0.0, "t2": 0.25 + 40 / 90, "t1": 0.0 + 1.0, "t3": 0.0 + 1.0}
    assert min(sums, key=sums.get) == "t2" and knee(front, OBJ)["trial_id"] == "t2"
    # two members equally far from the extremes' line (x + y = 0.75 each): the lower id
    tie = [row("e1", 1.0, 100), row("m9", 0.75, 50), row("m2", 0.5, 25), row("e2", 0.0, 0)]
    assert knee(tie, OBJ)["trial_id"] == "m2"
    assert knee([row("only", 0.5, 3)], OBJ)["trial_id"] == "only"


def test_knee_three_objectives_is_closest_to_the_ideal() -> None:
    obj = [*OBJ, ("params", "min")]
    front = [
        row("a", 1.0, 100, params=10.0),  # normalized (0, 1, 1): distance sqrt(2)
        row("b", 0.0, 0, params=0.0),  # (1, 0, 0): 1
        row("c", 0.6, 50, params=2.0),  # (0.4, 0.5, 0.2): sqrt(0.45) ~ 0.67
        row("d", 0.8, 70, params=6.0),  # (0.2, 0.7, 0.6): sqrt(0.89)
    ]
    assert knee(front, obj)["trial_id"] == "c"


def test_a_constraint_or_pick_on_what_the_run_lacks_is_one_line() -> None:
    for where, pick in ((["latency_ms<=5"], None), ([], "min:latency_ms")):
        with pytest.raises(KdsearchError) as e:
            choose(TRIALS, OBJ, where, pick)
        msg = str(e.value)
        assert "\n" not in msg and "recorded no latency_ms" in msg and "val_acc, flops, params" in msg
    with pytest.raises(KdsearchError, match="text column"):
        choose(TRIALS, OBJ, ["student.pos_embed==3"])
    with pytest.raises(KdsearchError, match="max and min need numbers"):
        choose(TRIALS, OBJ, [], "max:student.pos_embed")


def test_measured_figures_count_the_last_device_and_the_trial_own_value_wins() -> None:
    measured = [
        {"trial_id": "t1", "device": "cuda", "runtime": "torch", "latency_ms": 0.1, "time": 1.0},
        {"trial_id": "t1", "device": "cpu", "runtime": "torch", "latency_ms": 4.0, "time": 2.0},
        {"trial_id": "t2", "device": "cpu", "runtime": "torch", "latency_ms": 6.0, "time": 3.0},
    ]
    rows = with_measured([*TRIALS, row("t7", 0.1, 1, latency_ms=9.0)], measured)
    got = {r["trial_id"]: r.get("latency_ms") for r in rows}
    assert got == {"t1": 4.0, "t2": 6.0, "t3": None, "t4": None, "t5": None, "t6": None, "t7": 9.0}
    assert ids(choose(rows, OBJ, ["latency_ms<=5"])[0]) == ["t1"]


# --------------------------------------------------------------------------------------
# The commands, on a run built by hand
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny real students (weights saved untrained), accuracies set by hand: a front of
    three ("a" learned, "b" rope, "d" rope) and "c" dominated by "b"."""
    import torch
    from safetensors.torch import save

    from kdsearch.models.student import build_student
    from kdsearch.results.tables import TRIAL_COLUMNS, write_table
    from kdsearch.space.flops import count_flops
    from kdsearch.space.specs import StudentSpec, TrialSpec
    from kdsearch.storage import Storage

    run = tmp_path_factory.mktemp("hand") / "run"
    store = Storage.open(run)
    torch.manual_seed(0)
    students = {
        "a": (StudentSpec(embed_dim=8, depth=1, num_heads=2, pos_embed="learned"), 0.5),
        "b": (StudentSpec(embed_dim=16, depth=1, num_heads=2, pos_embed="rope"), 0.7),
        "c": (StudentSpec(embed_dim=16, depth=2, num_heads=2, pos_embed="rope"), 0.6),
        "d": (StudentSpec(embed_dim=24, depth=2, num_heads=2, pos_embed="rope"), 0.9),
    }
    rows = []
    for tid, (s, acc) in students.items():
        fc = count_flops(s)
        store.write_bytes(f"trials/{tid}/model.safetensors", save(build_student(s).state_dict()))
        rows.append(
            {
                **TrialSpec(student=s).to_dict(),
                "trial_id": tid,
                "status": "completed",
                "val_acc": acc,
                "flops": fc.flops,
                "macs": fc.macs,
                "params": fc.params,
                "epochs": 1,
                "checkpoint": f"trials/{tid}/model.safetensors",
            }
        )
    write_table(rows, store, "trials.parquet", TRIAL_COLUMNS)
    meta = {"objectives": [["val_acc", "max"], ["flops", "min"]], "trials": 4, "started": 0}
    store.write_text("run.json", json.dumps(meta))
    return run


def test_pareto_where_pick_and_an_empty_table(hand_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def front(*args: str) -> list[str]:
        assert run_cli(["pareto", str(hand_run), "--format", "json", *args]) == 0
        return [r["trial_id"] for r in json.loads(capsys.readouterr().out)["front"]]

    assert front() == ["a", "b", "d"]
    assert front("--where", "pos_embed==rope") == ["b", "d"]
    assert front("--where", "student.depth>=2") == ["c", "d"]  # c is on the front of what is left
    assert front("--pick", "min:params") == ["a"]
    assert front("--where", "val_acc>=0.95") == []
    assert run_cli(["pareto", str(hand_run), "--where", "val_acc>=0.95"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "no completed trial meets it (of 4 completed)" in captured.err
    assert run_cli(["pareto", str(hand_run), "--where", "latency_ms<=5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recorded no latency_ms" in err
    assert run_cli(["pareto", str(hand_run), "--where", "val_acc=>1"]) == 2
    assert "allowed:" in capsys.readouterr().err


def test_export_records_the_rule_and_an_empty_rule_exits_2(
    hand_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student"
    args = ["export", str(hand_run), "--out", str(out), "--max-gflops", "1", "--where", "student.pos_embed==rope"]
    assert run_cli([*args, "--pick", "min:val_acc"]) == 0, capsys.readouterr().err
    card = yaml.safe_load((out / "student.yaml").read_text())
    assert card["source"]["trial_id"] == "b"  # the front of rope trials is b, d: b has the lower val_acc
    assert card["chosen_by"] == {
        "rule": "--max-gflops 1 --where 'student.pos_embed==rope' --pick min:val_acc",
        "where": ["flops<=1e+09", "student.pos_embed==rope"],
        "pick": "min:val_acc",
        "candidates": 2,
    }
    readme = (out / "README.md").read_text()
    assert "| chosen by | `--max-gflops 1 --where 'student.pos_embed==rope' --pick min:val_acc`" in readme
    assert "pick min:val_acc among 2 qualifying front members" in readme
    capsys.readouterr()
    assert run_cli(["export", str(hand_run), "--out", str(tmp_path / "x"), "--where", "val_acc>0.95"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no completed trial meets it" in err and not (tmp_path / "x").exists()
    assert run_cli(["export", str(hand_run), "--out", str(tmp_path / "x"), "--trial", "a", "--pick", "knee"]) == 2
    assert "give it alone" in capsys.readouterr().err


def test_export_default_picks_are_todays(hand_run: Path) -> None:
    from kdsearch.results.export import select_trial
    from kdsearch.results.selection import choose_student
    from kdsearch.results.tables import load_run

    r = load_run(hand_run)
    for kw, pick in (({"max_gflops": 1.0}, "max:val_acc"), ({"min_acc": 0.6}, "min:flops")):
        chosen, rule = choose_student(r, **kw)
        assert chosen["trial_id"] == select_trial(r.trials, r.objectives, **kw)["trial_id"] and rule["pick"] == pick
        # the same shorthand with a --where that keeps everything picks the same member
        assert choose_student(r, where=["val_acc>=0"], **kw)[0]["trial_id"] == chosen["trial_id"]
    assert choose_student(r, min_acc=0.6)[0]["trial_id"] == "b"


def test_measure_where_pick(hand_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["measure", str(hand_run), "--where", "val_acc>=0.95"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measure --where 'val_acc>=0.95': no completed trial meets it" in err
    assert run_cli(["measure", str(hand_run), "--pick", "min:flops", "--format", "json"]) == 0
    measured = json.loads(capsys.readouterr().out)["measured"]
    assert [m["trial_id"] for m in measured] == ["a"]
    # what was measured now counts in --where
    assert run_cli(["pareto", str(hand_run), "--format", "json", "--where", "latency_ms>=0"]) == 0
    assert [r["trial_id"] for r in json.loads(capsys.readouterr().out)["front"]] == ["a"]
