"""What `kdsearch confirm`'s table (confirm.parquet) says: per-member means and 95% intervals
checked against hand-computed values, the confirmed front and which neighbours are within
noise, the per-encoding answer, and the report's "Confirmed with S seeds" section on a run
built on disk. No search runs here."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path

import pytest
from scipy import stats

from kdsearch.errors import KdsearchError
from kdsearch.results.confirm import (
    confirm_summary,
    confirmed_front,
    encoding_table,
    front_noise,
    load_confirm,
    mean_interval,
    member_stats,
    summarize,
)
from kdsearch.results.tables import CONFIRM_COLUMNS, RunPaths, load_run, write_json, write_table
from kdsearch.space.specs import StudentSpec
from tests.browser import CHROMIUM, NO_CHROMIUM, render
from tests.helpers import needs, run_cli

OBJECTIVES = [("val_acc", "max"), ("flops", "min")]

# Original trials: id -> (pos_embed, flops, the search's val_acc, test accuracies of its seeds)
# e: cheapest, one seed completed (two failed); a < b: a real gain; b ~ c: within noise; d: dominated
MEMBERS = {
    "e": ("none", 5e4, 0.55, [0.50]),
    "a": ("learned", 1e5, 0.85, [0.80, 0.81, 0.82]),
    "b": ("rope", 2e5, 0.93, [0.90, 0.91, 0.92]),
    "c": ("learned", 3e5, 0.95, [0.88, 0.92, 0.96]),
    "d": ("sincos", 4e5, 0.90, [0.85, 0.86, 0.84]),
}


def config(pe: str, embed_dim: int) -> dict:
    spec = StudentSpec(embed_dim=embed_dim, num_heads=2, depth=2, pos_embed=pe)
    return {f"student.{k}": v for k, v in dataclasses.asdict(spec).items()} | {"recipe.kd": 1.0, "train.lr": 1e-3}


def trial_rows() -> list[dict]:
    return [
        {
            "trial_id": tid,
            "status": "completed",
            "val_acc": val,
            "flops": flops,
            "macs": flops / 2,
            "params": flops / 10,
            "epochs": 2,
            "finished_at": 100.0 + i,
            **config(pe, 16 * (i + 1)),
        }
        for i, (tid, (pe, flops, val, _)) in enumerate(MEMBERS.items())
    ]


def confirm_rows() -> list[dict]:
    rows = []
    for i, (tid, (pe, flops, _, tests)) in enumerate(MEMBERS.items()):
        for seed, test in enumerate(tests):
            rows.append(
                {
                    "trial_id": tid,
                    "seed": seed,
                    "confirm_id": f"{tid}_{seed}",
                    "status": "completed",
                    "val_acc": test - 0.01,
                    "test_acc": test,
                    "flops": flops,
                    "macs": flops / 2,
                    "params": flops / 10,
                    "epochs": 2,
                    "wall_seconds": 1.5,
                    "error": None,
                    "finished_at": 200.0 + seed,
                    **config(pe, 16 * (i + 1)),
                }
            )
    # e's other two seeds failed: no accuracy, left out of every number but `failed`
    for seed in (1, 2):
        failed = {"seed": seed, "confirm_id": f"e_{seed}", "status": "failed", "val_acc": None, "test_acc": None}
        rows.append({**rows[0], **failed, "error": "RuntimeError: diverged"})
    return rows


@pytest.fixture(scope="module")
def members() -> list[dict]:
    return member_stats(confirm_rows(), trial_rows(), OBJECTIVES)


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {m["trial_id"]: m for m in rows}


# ---- per-member statistics, by hand ------------------------------------------------------------

T_2DOF = 4.303  # t(0.975; 2), from a printed table
T_4DOF = 2.776  # t(0.975; 4)


@pytest.mark.parametrize(
    "values, mean, std, half",
    [
        # n = 3: mean 0.92, std sqrt((0.04^2 + 0 + 0.04^2) / 2) = 0.04, half = 4.303 * 0.04 / sqrt(3) = 0.099373
        ([0.88, 0.92, 0.96], 0.92, 0.04, 0.099373),
        # n = 3: std sqrt((0.01^2 + 0 + 0.01^2) / 2) = 0.01, half = 4.303 * 0.01 / sqrt(3) = 0.024843
        ([0.80, 0.81, 0.82], 0.81, 0.01, 0.024843),
        # n = 2: std |0.7 - 0.9| / sqrt(2) = 0.141421; t(0.975; 1) = 12.706: half = 12.706 * 0.141421 / sqrt(2) = 1.2706
        ([0.7, 0.9], 0.8, 0.141421, 1.2706),
    ],
)
def test_mean_std_and_interval_by_hand(values, mean, std, half) -> None:
    got = mean_interval(values)
    assert got["n"] == len(values)
    assert got["mean"] == pytest.approx(mean, abs=1e-12) and got["std"] == pytest.approx(std, rel=1e-5)
    assert got["high"] - got["mean"] == pytest.approx(half, rel=2e-4)  # the table's quantiles have 4 digits
    assert got["mean"] - got["low"] == pytest.approx(half, rel=2e-4)
    assert 4.303 == pytest.approx(T_2DOF)


def test_one_seed_has_no_interval_and_none_has_no_mean() -> None:
    assert mean_interval([0.5]) == {"n": 1, "mean": 0.5, "std": None, "low": None, "high": None}
    assert mean_interval([]) == {"n": 0, "mean": None, "std": None, "low": None, "high": None}


def test_member_table(members) -> None:
    m = by_id(members)
    assert [x["trial_id"] for x in members] == ["e", "a", "b", "c", "d"]  # cheapest first
    a = m["a"]
    assert (a["n"], a["failed"], a["seeds"]) == (3, 0, [0, 1, 2])
    assert a["test_acc_mean"] == pytest.approx(0.81) and a["test_acc_std"] == pytest.approx(0.01)
    assert a["val_acc_mean"] == pytest.approx(0.80) and a["val_acc_std"] == pytest.approx(0.01)
    half = T_2DOF * 0.01 / math.sqrt(3)
    assert (a["test_acc_low"], a["test_acc_high"]) == (
        pytest.approx(0.81 - half, rel=1e-4),
        pytest.approx(0.81 + half, rel=1e-4),
    )
    assert a["search_val_acc"] == 0.85 and a["flops"] == 1e5 and a["params"] == 1e4
    assert a["pos_embed"] == "learned" and a["embed_dim"] == 32 and a["depth"] == 2
    e = m["e"]  # one completed seed (two failed, which count nowhere): a mean, no spread, no interval
    assert (e["failed"], e["seeds"], e["val_acc_mean"]) == (2, [0], pytest.approx(0.49))
    assert (e["n"], e["test_acc_mean"], e["test_acc_std"], e["test_acc_low"], e["test_acc_high"]) == (
        1,
        0.5,
        None,
        None,
        None,
    )


def test_a_member_whose_every_seed_failed_has_no_mean_and_is_not_on_the_front() -> None:
    rows = confirm_rows()
    rows = [{**r, "status": "failed", "test_acc": None, "val_acc": None} if r["trial_id"] == "b" else r for r in rows]
    summary = summarize(rows, trial_rows(), OBJECTIVES)
    b = by_id(summary["members"])["b"]
    assert (b["n"], b["failed"], b["test_acc_mean"]) == (0, 3, None)
    assert [m["trial_id"] for m in summary["front"]] == ["e", "a", "c"]
    json.dumps(summary)  # plain values only


# ---- the confirmed front and its noise ----------------------------------------------------------


def test_confirmed_front_and_which_neighbours_are_within_noise(members) -> None:
    front = confirmed_front(members, OBJECTIVES)
    assert [m["trial_id"] for m in front] == ["e", "a", "b", "c"]  # d (0.85 at 4e5) is beaten by b and c
    noise = {(r["cheaper"], r["dearer"]): r for r in front_noise(front, OBJECTIVES)}
    assert list(noise) == [("e", "a"), ("a", "b"), ("b", "c")]
    # e has one seed: no variance, no verdict
    assert noise["e", "a"]["within_noise"] is None and "cannot tell" in noise["e", "a"]["note"]
    # b - a = 0.10; equal stds 0.01, n = 3: se = sqrt(2 * 0.01^2 / 3), Welch dof = 4 exactly
    ab = noise["a", "b"]
    se = math.sqrt(2 * 0.01**2 / 3)
    assert ab["diff"] == pytest.approx(0.10) and ab["dof"] == pytest.approx(4.0)
    assert ab["diff_high"] - ab["diff"] == pytest.approx(T_4DOF * se, rel=2e-4)
    ref = stats.ttest_ind(MEMBERS["b"][3], MEMBERS["a"][3], equal_var=False)
    assert ab["p"] == pytest.approx(ref.pvalue) and ab["p"] < 0.05 and ab["within_noise"] is False
    assert "a real difference" in ab["note"]
    # c - b = 0.01 against stds 0.04 and 0.01: within noise, the interval holds 0
    bc = noise["b", "c"]
    ref = stats.ttest_ind(MEMBERS["c"][3], MEMBERS["b"][3], equal_var=False)
    assert bc["p"] == pytest.approx(ref.pvalue) and bc["p"] >= 0.05 and bc["within_noise"] is True
    assert bc["diff_low"] < 0 < bc["diff_high"] and "within noise" in bc["note"]
    assert bc["rule"] == "welch p >= 0.05"


def test_seeds_that_agree_exactly_differ_without_noise() -> None:
    rows = [
        {"trial_id": t, "seed": s, "status": "completed", "val_acc": acc, "test_acc": acc, "flops": f}
        for t, acc, f in (("x", 0.8, 1.0), ("y", 0.9, 2.0))
        for s in range(2)
    ]
    (r,) = front_noise(confirmed_front(member_stats(rows, (), OBJECTIVES), OBJECTIVES), OBJECTIVES)
    assert (r["diff"], r["p"], r["within_noise"]) == (pytest.approx(0.1), 0.0, False)


# ---- per encoding ----------------------------------------------------------------------------


def test_encoding_table(members) -> None:
    rows = encoding_table(members, OBJECTIVES)
    at = {}
    for r in rows:
        at.setdefault(r["max_flops"], []).append(r)
    assert sorted(at) == [5e4, 1e5, 2e5, 3e5, 4e5]  # every confirmed member's cost
    assert [(r["pos_embed"], r["verdict"]) for r in at[2e5]] == [
        ("rope", "best"),
        ("learned", "worse than rope"),
        ("none", "cannot tell against rope (needs 2 seeds each)"),
    ]
    assert [(r["pos_embed"], r["trial_id"], r["verdict"]) for r in at[3e5]][:2] == [
        ("learned", "c", "best"),
        ("rope", "b", "within noise of learned"),
    ]
    best = at[3e5][0]
    assert best["diff"] is None and best["test_acc_mean"] == pytest.approx(0.92)
    # 0.92 + 4.303 * 0.04 / sqrt(3) = 1.0194 is past 1: clipped there; the low bound is the t bound
    assert best["test_acc_high"] == 1.0
    assert 0.92 - best["test_acc_low"] == pytest.approx(T_2DOF * 0.04 / math.sqrt(3), rel=2e-4)
    # at <= 2e5 learned's a (0.81) trails rope's b (0.91) by 0.10, its whole interval below 0
    learned = at[2e5][1]
    assert (learned["trial_id"], learned["vs"], learned["within_noise"]) == ("a", "rope", False)
    assert learned["diff"] == pytest.approx(-0.10) and learned["diff_high"] < 0
    # at <= 3e5 rope's b is 0.01 behind learned's c: the interval holds 0
    rope = at[3e5][1]
    assert rope["diff"] == pytest.approx(-0.01) and rope["diff_low"] < 0 < rope["diff_high"]
    # at <= 1e5 none's e has one seed (no verdict), and sincos has no member at all
    assert [(r["pos_embed"], r["verdict"]) for r in at[1e5]] == [
        ("learned", "best"),
        ("none", "cannot tell against learned (needs 2 seeds each)"),
    ]


# ---- on disk: the loader, the summary, the report -------------------------------------------


def make_run(root: Path, confirmed: bool = True) -> RunPaths:
    paths = RunPaths.at(root / "run")
    meta = {
        "name": "run",
        "objectives": [list(o) for o in OBJECTIVES],
        "trials": len(MEMBERS),
        "started": 99.0,
        "hypervolume_reference": {"val_acc": 0.0, "flops": 1e6},
    }
    write_json(paths.store, RunPaths.META, meta)
    write_table(trial_rows(), paths.store, RunPaths.TRIALS, ("trial_id",))
    if confirmed:
        write_table(confirm_rows(), paths.store, RunPaths.CONFIRM, CONFIRM_COLUMNS)
    return paths


def add_study(paths: RunPaths) -> None:
    """A study.db as the searcher keeps it: six completed trials over three searched settings."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{paths.store.local_path(RunPaths.STUDY)}",
        study_name="kdsearch",
        directions=["maximize", "minimize"],
    )
    dists = {
        "recipe.alpha": FloatDistribution(0.0, 1.0),
        "recipe.temperature": FloatDistribution(1.0, 8.0),
        "student.embed_dim": IntDistribution(16, 64),
    }
    for i in range(6):
        params = {"recipe.alpha": i / 6, "recipe.temperature": 1.0 + (i * 5) % 7, "student.embed_dim": 16 + 8 * i}
        trial = optuna.trial.create_trial(params=params, distributions=dists, values=[0.5 + i / 20, 1e5 * (1 + i % 3)])
        study.add_trial(trial)


def test_loader_and_summary(tmp_path) -> None:
    paths = make_run(tmp_path)
    run = load_run(paths.uri)
    rows = load_confirm(run)
    assert len(rows) == 15 and list(rows[0])[: len(CONFIRM_COLUMNS)] == list(CONFIRM_COLUMNS)
    summary = confirm_summary(run)
    assert summary["seeds"] == 3 and summary["retrainings"] == 15 and summary["failed"] == 2
    assert [m["trial_id"] for m in summary["front"]] == ["e", "a", "b", "c"]
    assert summary["objectives"] == [["test_acc_mean", "max"], ["flops", "min"]]
    assert json.loads(json.dumps(summary))["members"][1]["test_acc_mean"] == pytest.approx(0.81)
    paths.store.local_path(RunPaths.CONFIRM).unlink()
    assert load_confirm(run) == []
    with pytest.raises(KdsearchError, match="no confirm.parquet yet"):
        confirm_summary(run)
    write_table([{"trial_id": "a", "status": "completed"}], paths.store, RunPaths.CONFIRM, ("trial_id",))
    with pytest.raises(KdsearchError, match=r"lacks the column\(s\) seed, test_acc"):
        load_confirm(run)


def test_the_report_shows_the_confirmed_section(tmp_path) -> None:
    from PIL import Image

    from kdsearch.results.plots import confirmed_front_chart

    paths = make_run(tmp_path)
    add_study(paths)  # the importance sections too: every heading says what it measures (issue 21)
    out = tmp_path / "report"
    assert run_cli(["report", paths.uri, "--out", str(out)]) == 0
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    how = "(PED-ANOVA over the completed feasible trials, normalized to sum to 1)"
    for heading in (
        f"Importance of each searched setting for val_acc {how}",
        f"Importance of each distillation-recipe setting for val_acc {how}",
        "Front members: the trials no other trial beats in val_acc (max) and flops (min)",
        "Confirmed with 3 seeds: mean test accuracy on the held-out split "
        "(95% Student t interval of the mean over the seeds, clipped to [0, 1] (accuracies lie there))",
    ):
        assert f"## {heading}\n" in md and f"<h2>{heading}</h2>" in page.replace("&#x27;", "'")
    md_headings = re.findall(r"^#{2,3} (.*)$", md, re.M)
    page_headings = re.findall(r"<h[23]>(.*?)</h[23]>", page)
    assert len(md_headings) == len(page_headings) >= 12
    for heading in md_headings + page_headings:  # a name, then what is measured: "Throughput: ..."
        assert re.search(r"\w: \w|\w for \w", heading), f"the heading {heading!r} does not say what it measures"
    interval_c = "0.9200 [0.8206, 1.0000] clipped"  # 0.92 +- 4.303 * 0.04 / sqrt(3) = [0.8206, 1.0194], clipped
    for text in (html.unescape(page), md):
        assert "Confirmed with 3 seeds" in text
        assert interval_c in text and "0.8000 ± 0.0100" in text  # c's test interval, a's val mean ± std
        assert "0.5000 (n = 1: no interval)" in text and "1 (2 failed)" in text
        assert "Welch's t-test" in text and "within noise, the cheaper one is as good as 3 seeds can tell" in text
        assert "within noise of learned" in text and "worse than rope" in text
    assert page.count("Plotly.newPlot") >= 3 and '"error_y":{"array":[' in page and 'id="confirm"' in page
    assert page.index('id="confirm"') < page.index('id="fig0"')  # the first figure carries plotly's script
    assert "![confirmed front](confirm_front.png)" in md
    assert Image.open(out / "confirm_front.png").size == (800, 560)
    chart = confirmed_front_chart(summarize(confirm_rows(), trial_rows(), OBJECTIVES))
    learned = next(s for s in chart.series if s.name == "learned")
    assert learned.y == pytest.approx([0.81, 0.92]) and learned.y_error_minus == pytest.approx(
        [T_2DOF * 0.01 / math.sqrt(3), T_2DOF * 0.04 / math.sqrt(3)], rel=2e-4
    )
    assert learned.y_error == pytest.approx([T_2DOF * 0.01 / math.sqrt(3), 0.08], rel=2e-4)  # c's bar ends at 1
    assert next(s for s in chart.series if s.name == "none").y_error == [None]
    assert [s.name for s in chart.series][-1] == "confirmed front"

    # without confirm.parquet the report has no such section
    plain = make_run(tmp_path / "plain", confirmed=False)
    out = tmp_path / "plain-report"
    assert run_cli(["report", plain.uri, "--out", str(out)]) == 0
    assert "Confirmed with" not in (out / "report.html").read_text() + (out / "report.md").read_text()
    assert not (out / "confirm_front.png").exists()


@needs(None if CHROMIUM else NO_CHROMIUM)
def test_the_confirmed_report_renders_in_headless_chromium(tmp_path) -> None:
    """The confirm figure comes first and carries plotly's script: every figure after it draws."""
    paths = make_run(tmp_path)
    assert run_cli(["report", paths.uri, "--out", str(tmp_path / "report")]) == 0
    dom, errors = render(tmp_path / "report" / "report.html")
    assert errors == [] and "<title>ERROR" not in dom
    assert dom.count('class="main-svg"') >= 2 * 5  # the confirmed front, the front, encodings, hypervolume x2
    assert 'class="errorbars"' in dom
