"""What a one-shot run's files say (kdsearch.results.oneshot): each trained student's inherited
against trained accuracy and Kendall's tau over them (checked by hand, ties too), the stages'
shares of the run's time, the report's "One-shot screening" section (and its absence from a
standard run's report), and `kdsearch status`'s stage line in each stage. The run is written on
disk in the files' own layout (issue 22's contract); no search runs here."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path

import pytest

from kdsearch.results.oneshot import (
    SCREENING,
    STAGES,
    SUPERNET_EPOCHS,
    inherited_pairs,
    kendall_tau,
    latest_subnets,
    load_oneshot,
    stage_status,
)
from kdsearch.results.parts import PartsWriter, parts_dir
from kdsearch.results.tables import TRIAL_COLUMNS, RunPaths, load_run, write_json, write_table
from kdsearch.space.specs import StudentSpec
from tests.helpers import run_cli

OBJECTIVES = [("val_acc", "max"), ("flops", "min")]
STARTED = 1000.0
# stages.json of a run that ended: setup 10 s, supernet 60 s, screening 15 s, training 115 s (200 s in all)
STAGES_DONE = {
    "supernet": {"started": 1010.0, "ended": 1070.0, "epochs": 4, "of": 4},
    "screening": {"started": 1070.0, "ended": 1085.0, "scored": 8, "of": 8},
}
ENDED = 1200.0


def student(embed_dim: int, pe: str = "learned") -> dict:
    """A student's columns as trials.parquet names them (every StudentSpec field)."""
    spec = StudentSpec(embed_dim=embed_dim, num_heads=2, depth=2, pos_embed=pe)
    return {f"student.{k}": v for k, v in dataclasses.asdict(spec).items()}


# trials: id -> (status, trained val_acc, the student's embed_dim); embed_dim 80 was never screened
TRIALS = {
    "t0": ("completed", 0.60, 16),
    "t1": ("completed", 0.70, 24),
    "t2": ("completed", 0.65, 32),
    "t3": ("completed", 0.80, 40),  # its inherited score ties t2's
    "t4": ("stopped_early", 0.50, 48),  # not completed: no pair
    "t5": ("failed", None, 56),
    "t6": ("completed", 0.90, 80),  # Optuna's own sample past the kept ones: unmatched
}
# screening: embed_dim -> (inherited_val_acc, rank, kept); 56 was over the budget (recorded
# unscored, as the search records it), 64 screened, not kept, not trained
SCREENED = {16: (0.30, 1, 0), 24: (0.40, 1, 1), 32: (0.50, 2, 2), 40: (0.50, 1, 3), 48: (0.45, 2, 4), 56: (None, 0, -1)}
SCREENED_MORE = {64: (0.10, 3, -1)}


def trial_rows() -> list[dict]:
    return [
        {
            "trial_id": tid,
            "status": status,
            "val_acc": val,
            "flops": 1e4 * dim,
            "params": 100.0 * dim,
            "epochs": 2,
            "finished_at": 1100.0 + i,
            "recipe.alpha": 0.5,
            **student(dim, "rope" if dim == 24 else "learned"),
        }
        for i, (tid, (status, val, dim)) in enumerate(TRIALS.items())
    ]


def screening_rows() -> list[dict]:
    rows = []
    for i, (dim, (inherited, rank, kept)) in enumerate((SCREENED | SCREENED_MORE).items()):
        rows.append(
            {
                "subnet_id": i,
                **student(dim, "rope" if dim == 24 else "learned"),
                "inherited_val_acc": inherited,
                "flops": 1e4 * dim,
                "feasible": dim != 56,
                "rank": rank,
                "kept": kept,
                "scored_at": 0.5 * i,
            }
        )
    # the screening asked 40's student twice: the kept row (0.50) is the one a trial is paired with
    rows.insert(0, {**rows[3], "subnet_id": 99, "inherited_val_acc": 0.99, "kept": -1})
    return rows


def make_run(root: Path, stages: dict | None = STAGES_DONE, ended: float | None = ENDED) -> RunPaths:
    """A run on disk; with `stages` a one-shot run (its oneshot/ files), without a standard one."""
    paths = RunPaths.at(root / "run")
    meta = {
        "name": "run",
        "objectives": [list(o) for o in OBJECTIVES],
        "trials": len(TRIALS),
        "started": STARTED,
        "hypervolume_reference": {"val_acc": 0.0, "flops": 1e6},
    }
    write_json(paths.store, RunPaths.META, meta | ({"ended": ended} if ended is not None else {}))
    write_table(trial_rows(), paths.store, RunPaths.TRIALS, TRIAL_COLUMNS)
    if stages is not None:
        write_json(paths.store, STAGES, stages)
        epochs = [
            {"epoch": e, "loss": 2.0 / e, "seconds": 15.0, "images_per_s": 900.0, "largest_val_acc": 0.2 * e}
            | {"smallest_val_acc": 0.1 * e}
            for e in (1, 2, 3, 4)
        ]
        write_table(epochs, paths.store, SUPERNET_EPOCHS, ("epoch",))
        # as the search writes it while it screens: a whole file, then parts (a later row of a subnet wins)
        rows = screening_rows()
        stale = {**rows[3], "rank": 0, "kept": -1}  # subnet 2 before the ranking, replaced by its part's row
        write_table([*rows[:3], stale, rows[4]], paths.store, SCREENING, ("subnet_id",))
        PartsWriter(paths.store, SCREENING, ("subnet_id",), latest_subnets).append([rows[3], *rows[5:]])
        assert paths.store.exists(parts_dir(SCREENING))
    return paths


# ---- tau and its pairs, by hand ------------------------------------------------------------------


@pytest.mark.parametrize(
    "inherited, trained, tau",
    [
        # 6 pairs, 5 concordant, 1 discordant: (5 - 1) / 6
        ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),
        # ties: pair (1, 2) tied in x, (3, 4) tied in y; C = 4, D = 0; tau_b = 4 / sqrt((6 - 1)(6 - 1)) = 0.8
        ([1, 1, 2, 3], [1, 2, 3, 3], 0.8),
        ([1, 2, 3], [3, 2, 1], -1.0),
    ],
)
def test_kendall_tau_by_hand(inherited, trained, tau) -> None:
    got, n, p = kendall_tau(inherited, trained)
    assert got == pytest.approx(tau) and n == len(inherited) and 0 < p <= 1


@pytest.mark.parametrize(
    "inherited, trained", [([0.1, 0.2], [0.3, 0.4]), ([], []), ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]), ([1, 2, 3], [7] * 3)]
)
def test_no_tau_with_fewer_than_three_pairs_or_no_variance(inherited, trained) -> None:
    assert kendall_tau(inherited, trained) == (None, len(inherited), None)


def test_pairs_and_tau_of_a_run(tmp_path) -> None:
    shot = load_oneshot(make_run(tmp_path))
    assert shot is not None
    # completed and screened only: t4 stopped early, t5 failed, t6's student was never screened
    assert [(t["trial_id"], t["inherited_val_acc"], t["val_acc"]) for t in shot.trained] == [
        ("t0", 0.30, 0.60),
        ("t1", 0.40, 0.70),
        ("t2", 0.50, 0.65),
        ("t3", 0.50, 0.80),  # the kept row of 40's student, not its unkept duplicate (0.99)
    ]
    assert [t["subnet_id"] for t in shot.trained] == [0, 1, 2, 3] and shot.unmatched == 1
    assert shot.trained[1]["student.pos_embed"] == "rope"
    # C = 4 (0-1, 0-2, 0-3, 1-3), D = 1 (1-2), t2-t3 tied in inherited: 3 / sqrt(5 x 6)
    assert shot.kendall_tau == pytest.approx(3 / math.sqrt(30)) and shot.tau_n == 4
    assert len(shot.screening) == 8 and shot.kept == 5 and [e["epoch"] for e in shot.supernet_epochs] == [1, 2, 3, 4]
    # shares of the run's 200 s: setup 10, supernet 60, screening 15, training 115
    assert shot.run_seconds == 200.0
    assert shot.seconds == {"setup": 10.0, "supernet": 60.0, "screening": 15.0, "training": 115.0}
    assert shot.supernet_share == pytest.approx(0.30) and shot.screening_share == pytest.approx(0.075)


def test_a_student_differing_in_one_column_is_not_paired() -> None:
    trials = [{"trial_id": "a", "status": "completed", "val_acc": 0.5, **student(16)}]
    screened = [{"subnet_id": 0, **student(16), "inherited_val_acc": 0.3, "kept": 0}]
    assert len(inherited_pairs(trials, screened)[0]) == 1
    trials[0]["student.distill_token"] = True
    assert inherited_pairs(trials, screened) == ([], 1)


def test_a_standard_run_has_no_oneshot(tmp_path) -> None:
    assert load_oneshot(make_run(tmp_path, stages=None)) is None


def test_a_run_that_goes_on_measures_its_stages_to_now(tmp_path) -> None:
    stages = {"supernet": {"started": 1010.0, "ended": None, "epochs": 1, "of": 4}}
    shot = load_oneshot(make_run(tmp_path, stages, ended=None), now=1050.0)
    assert shot.seconds == {"setup": 10.0, "supernet": 40.0, "screening": None, "training": None}
    assert shot.run_seconds == 50.0 and shot.supernet_share == pytest.approx(0.8) and shot.screening_share is None


# ---- the report ------------------------------------------------------------------------------------

HEADING = "One-shot screening: a weight-sharing supernet scored subnets, the kept ones were trained"


def test_the_report_has_the_one_shot_section_and_a_standard_one_does_not(tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "report"
    assert run_cli(["report", make_run(tmp_path).uri, "--out", str(out)]) == 0
    page, md = html.unescape((out / "report.html").read_text()), (out / "report.md").read_text()
    tau = "Kendall's tau = 0.548, n = 4"  # 3 / sqrt(30) in the chart's title
    sentence = "The screening's rank agreement with training is Kendall's tau = 0.55 over n = 4 trained students"
    for text in (page, md):
        assert HEADING in text and sentence in text
        assert "7 subnets scored with inherited weights (the screening's target: 8; 1 more over the budget, " in text
        assert "recorded unscored): 4 on the screened front, 5 kept for training. " in text
        assert "Of the completed trials, 4 trained a screened subnet and 1 a student Optuna sampled itself" in text
        assert "30.0%" in text and "7.5%" in text and "57.5%" in text  # supernet, screening, training shares
    assert tau in page  # plotly's title, in the figure's JSON
    assert page.count("Plotly.newPlot") >= 3 and 'id="oneshot"' in page
    assert page.index('id="fig0"') < page.index('id="oneshot"')  # after the figure that inlines plotly's script
    assert "![inherited against trained accuracy](oneshot_tau.png)" in md
    assert Image.open(out / "oneshot_tau.png").size == (800, 560)
    md_headings = re.findall(r"^#{2,3} (.*)$", md, re.M)
    assert len(md_headings) == len(re.findall(r"<h[23]>(.*?)</h[23]>", page))
    for heading in md_headings:  # a name, then what is measured
        assert re.search(r"\w: \w|\w for \w", heading), heading

    plain = tmp_path / "plain-report"
    assert run_cli(["report", make_run(tmp_path / "plain", stages=None).uri, "--out", str(plain)]) == 0
    both = (plain / "report.html").read_text() + (plain / "report.md").read_text()
    assert "One-shot" not in both and "Kendall" not in both and not (plain / "oneshot_tau.png").exists()


def test_the_report_says_when_tau_is_not_measured(tmp_path) -> None:
    from kdsearch.results.oneshot_report import trust_sentence

    paths = make_run(tmp_path)
    rows = [r for r in trial_rows() if r["trial_id"] in ("t0", "t1")]
    write_table(rows, paths.store, RunPaths.TRIALS, TRIAL_COLUMNS)
    assert trust_sentence(load_oneshot(paths)).startswith(
        "Kendall's tau needs at least 3 trained students with an inherited score and the run has 2"
    )
    tied = [{**r, "val_acc": 0.7} for r in trial_rows()]
    write_table(tied, paths.store, RunPaths.TRIALS, TRIAL_COLUMNS)
    assert "n = 4 trained students, as every trained accuracy is the same" in trust_sentence(load_oneshot(paths))
    assert load_run(paths.uri).trials  # the tables stay readable as a run


# ---- status --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages, now, ended, stage, line",
    [
        (
            {},
            1004.0,
            None,
            "setup",
            "one-shot stage 0 of 3: preparing the data and the teacher's logits, elapsed 0:00:04",
        ),
        (
            {"supernet": {"started": 1010.0, "ended": None, "epochs": 3, "of": 10}},
            1050.0,
            None,
            "supernet",
            "one-shot stage 1 of 3: supernet, epoch 3 of 10 trained, elapsed 0:00:40",
        ),
        (
            {**STAGES_DONE, "screening": {"started": 1070.0, "ended": None, "scored": 250, "of": 1000}},
            1075.0,
            None,
            "screening",
            "one-shot stage 2 of 3: screening, 250 of 1000 subnets scored, elapsed 0:00:05"
            " (supernet took 0:01:00 (4 epochs))",
        ),
        (
            STAGES_DONE,
            1685.0,
            None,
            "training",
            "one-shot stage 3 of 3: training the kept students, elapsed 0:10:00"
            " (supernet took 0:01:00 (4 epochs); screening took 0:00:15 (8 subnets))",
        ),
        (
            STAGES_DONE,
            9999.0,
            ENDED,
            "ended",
            "one-shot: ended after its training stage, took 0:01:55"
            " (supernet took 0:01:00 (4 epochs); screening took 0:00:15 (8 subnets))",
        ),
    ],
)
def test_the_stage_line_in_each_stage(stages, now, ended, stage, line) -> None:
    s = stage_status(stages, now, ended, STARTED)
    assert s["stage"] == stage and s["line"] == line


def test_status_says_the_stage(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = {**STAGES_DONE, "screening": {"started": 1070.0, "ended": None, "scored": 3, "of": 8}}
    paths = make_run(tmp_path, stages, ended=None)
    assert run_cli(["status", paths.uri]) == 0
    assert "one-shot stage 2 of 3: screening, 3 of 8 subnets scored, elapsed" in capsys.readouterr().out
    assert run_cli(["status", paths.uri, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["oneshot"]["stage"] == "screening" and status["oneshot"]["screening"]["scored"] == 3
    assert status["finished"] == len(TRIALS)
    standard = make_run(tmp_path / "plain", stages=None)
    assert run_cli(["status", standard.uri, "--json"]) == 0
    assert "oneshot" not in json.loads(capsys.readouterr().out)
    assert run_cli(["status", standard.uri]) == 0
    assert "one-shot" not in capsys.readouterr().out
