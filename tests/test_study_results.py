"""What `kdsearch study`'s table (study.parquet) says (kdsearch.results.study): per student,
resolution and mode the mean test accuracy with its t interval checked by hand, the winner at each
resolution beyond or within noise, one seed giving no interval, the wide-against-deep bins; and
the report's "Study" section on a run written by hand, in the HTML, the Markdown and a real
headless Chromium. No search runs here."""

from __future__ import annotations

import dataclasses
import html
import math
import re
from pathlib import Path

import pytest
from scipy import stats

from kdsearch.errors import KdsearchError
from kdsearch.results.report import write_report
from kdsearch.results.study import (
    STUDY_FILE,
    cost_bins,
    load_study,
    resolution_winners,
    study_summary,
    wide_vs_deep,
)
from kdsearch.results.study_report import (
    HEADING,
    RESOLUTION_HEADING,
    WIDE_HEADING,
    WINNERS_HEADING,
    study_section_html,
    study_section_markdown,
)
from kdsearch.results.tables import CONFIRM_COLUMNS, RunPaths, load_run, write_json, write_table
from kdsearch.space.specs import StudentSpec
from tests.browser import CHROMIUM, NO_CHROMIUM, render
from tests.helpers import needs

OBJECTIVES = [("val_acc", "max"), ("flops", "min")]
T_2DOF = 4.303  # t(0.975; 2), from a printed table
FIRST = ("trial_id", "pos_embed", "img_size", "trained_img_size", "mode", "seed", "status", "val_acc", "test_acc")

# the run's trials: id -> (status, flops, depth, embed_dim, pos_embed, val_acc)
TRIALS = {
    "t1": ("completed", 1e5, 2, 32, "learned", 0.60),
    "t2": ("completed", 1.5e5, 2, 24, "none", 0.70),
    "t3": ("completed", 2e5, 4, 16, "learned", 0.65),
    "t4": ("completed", 5e5, 2, 64, "sincos", 0.80),  # confirmed: test 0.75 and 0.77
    "t5": ("completed", 1e6, 4, 48, "rope", 0.90),
    "t6": ("completed", 8e5, 4, 40, "learned", 0.86),
    "t7": ("failed", 3e5, 2, 32, "learned", None),
    "t8": ("stopped_early", 3e5, 2, 32, "learned", 0.30),
}
# the study: (trial, img_size, mode) -> test accuracies of its seeds (None: a failed seed); trained at 16 px.
# At 24 fine-tuned t5 (rope) beats t3 (learned) beyond noise; at 12 t3 leads t5 within noise;
# zero-shot has one seed each, so no interval and no verdict
STUDY = {
    ("t3", 16, "zero_shot"): [0.80],
    ("t5", 16, "zero_shot"): [0.82],
    ("t2", 16, "zero_shot"): [0.70],
    ("t3", 24, "zero_shot"): [0.60],
    ("t5", 24, "zero_shot"): [0.64],
    ("t3", 24, "finetuned"): [0.80, 0.81, 0.82],
    ("t5", 24, "finetuned"): [0.90, 0.91, 0.92],
    ("t3", 12, "finetuned"): [0.88, 0.92, 0.96],
    ("t5", 12, "finetuned"): [0.90, 0.91, 0.92],
    ("t2", 12, "finetuned"): [0.55, None],
}


def student(pe: str, embed_dim: int, depth: int) -> dict:
    spec = StudentSpec(embed_dim=embed_dim, num_heads=2, depth=depth, pos_embed=pe)
    return {f"student.{k}": v for k, v in dataclasses.asdict(spec).items()}


def trial_rows() -> list[dict]:
    return [
        {
            "trial_id": tid,
            "status": status,
            "val_acc": val,
            "flops": flops,
            "macs": flops / 2,
            "params": flops / 10,
            "epochs": 2,
            "finished_at": 100.0 + i,
            **student(pe, dim, depth),
        }
        for i, (tid, (status, flops, depth, dim, pe, val)) in enumerate(TRIALS.items())
    ]


def confirm_rows() -> list[dict]:
    t4 = next(r for r in trial_rows() if r["trial_id"] == "t4")
    return [
        {**t4, "seed": s, "confirm_id": f"t4_{s}", "status": "completed", "test_acc": acc, "val_acc": acc}
        for s, acc in ((1, 0.75), (2, 0.77))
    ]


def study_rows() -> list[dict]:
    rows = []
    for (tid, px, mode), accs in STUDY.items():
        _, _, depth, dim, pe, _ = TRIALS[tid]
        for i, acc in enumerate(accs):
            rows.append(
                {
                    "trial_id": tid,
                    "pos_embed": pe,
                    "img_size": px,
                    "trained_img_size": 16,
                    "mode": mode,
                    "seed": i if mode == "zero_shot" else 1 + i,
                    "status": "failed" if acc is None else "completed",
                    "val_acc": None if acc is None else acc - 0.01,
                    "test_acc": acc,
                    "flops": TRIALS[tid][1] * (px / 16) ** 2,
                    "params": TRIALS[tid][1] / 10,
                    "finetune_epochs": 0 if mode == "zero_shot" else 2,
                    "wall_seconds": 1.0,
                    "error": "RuntimeError: diverged" if acc is None else None,
                    "finished_at": 300.0,
                    **student(pe, dim, depth),
                }
            )
    return rows


def cell(summary: list[dict], tid: str, px: int, mode: str) -> dict:
    return next(s for s in summary if (s["trial_id"], s["img_size"], s["mode"]) == (tid, px, mode))


# ---- the statistics, by hand ----------------------------------------------------------------------


def test_summary_means_and_t_intervals_by_hand() -> None:
    summary = study_summary(study_rows())
    assert len(summary) == len(STUDY)
    t3 = cell(summary, "t3", 24, "finetuned")  # 0.81 +- 4.303 * 0.01 / sqrt(3)
    half = T_2DOF * 0.01 / math.sqrt(3)
    assert (t3["pos_embed"], t3["trained_img_size"], t3["n"], t3["failed"]) == ("learned", 16, 3, 0)
    assert t3["test_acc_mean"] == pytest.approx(0.81) and t3["test_acc_std"] == pytest.approx(0.01)
    assert t3["test_acc_low"] == pytest.approx(0.81 - half, rel=2e-4)
    assert t3["test_acc_high"] == pytest.approx(0.81 + half, rel=2e-4)
    assert t3["val_acc_mean"] == pytest.approx(0.80) and t3["flops"] == pytest.approx(2e5 * 2.25)
    # 0.92 + 4.303 * 0.04 / sqrt(3) = 1.0194 is past 1: clipped there, as confirm clips
    wide = cell(summary, "t3", 12, "finetuned")
    assert wide["test_acc_high"] == 1.0
    assert 0.92 - wide["test_acc_low"] == pytest.approx(T_2DOF * 0.04 / math.sqrt(3), rel=2e-4)


def test_one_seed_gives_no_interval_and_failed_seeds_count_nowhere() -> None:
    summary = study_summary(study_rows())
    zero = cell(summary, "t5", 16, "zero_shot")
    assert (zero["n"], zero["test_acc_mean"], zero["test_acc_std"], zero["test_acc_low"]) == (1, 0.82, None, None)
    t2 = cell(summary, "t2", 12, "finetuned")  # one completed seed, one failed
    assert (t2["n"], t2["failed"], t2["test_acc_mean"], t2["test_acc_high"]) == (1, 1, 0.55, None)
    winners = {(w["img_size"], w["mode"]): w for w in resolution_winners(summary)}
    at16 = winners[16, "zero_shot"]  # rope 0.82 over learned 0.80, one seed each: no verdict
    assert (at16["winner"], at16["trial_id"], at16["runner_up"], at16["n_encodings"]) == ("rope", "t5", "learned", 3)
    assert at16["lead"] == pytest.approx(0.02) and at16["within_noise"] is None and at16["p"] is None


def test_a_winner_beyond_noise_and_one_within_noise() -> None:
    winners = {(w["img_size"], w["mode"]): w for w in resolution_winners(study_summary(study_rows()))}
    assert list(winners) == [(12, "finetuned"), (16, "zero_shot"), (24, "zero_shot"), (24, "finetuned")]
    beyond = winners[24, "finetuned"]  # rope 0.91 against learned 0.81, stds 0.01: p << 0.05
    ref = stats.ttest_ind(STUDY["t5", 24, "finetuned"], STUDY["t3", 24, "finetuned"], equal_var=False)
    assert (beyond["winner"], beyond["runner_up"], beyond["within_noise"]) == ("rope", "learned", False)
    assert beyond["lead"] == pytest.approx(0.10) and beyond["p"] == pytest.approx(ref.pvalue) and ref.pvalue < 0.05
    within = winners[12, "finetuned"]  # learned 0.92 (std 0.04) against rope 0.91: the lead is noise
    ref = stats.ttest_ind(STUDY["t3", 12, "finetuned"], STUDY["t5", 12, "finetuned"], equal_var=False)
    assert (within["winner"], within["trial_id"], within["runner_up"], within["within_noise"]) == (
        "learned",
        "t3",
        "rope",
        True,
    )
    assert within["lead"] == pytest.approx(0.01) and within["p"] == pytest.approx(ref.pvalue) and ref.pvalue >= 0.05
    assert within["n_encodings"] == 3 and winners[24, "zero_shot"]["n_encodings"] == 2


def test_wide_vs_deep_bins_hold_the_right_students() -> None:
    # log10 cost spans 5..6: two bins split at 10^5.5 = 3.16e5
    edges = cost_bins([1e5, 1e6, 5e5], 2)
    assert edges == [(1e5, pytest.approx(10**5.5)), (pytest.approx(10**5.5), 1e6)]
    rows = wide_vs_deep(trial_rows(), confirm_rows(), OBJECTIVES, bins=2)
    got = {(r["bin"], r["depth"]): r for r in rows}
    assert list(got) == [(0, 2), (0, 4), (1, 2), (1, 4)]  # failed t7 and stopped t8 left out
    shallow = got[0, 2]  # t1 (0.60) and t2 (0.70): mean 0.65, std 0.0707, t(0.975; 1) = 12.706
    assert (shallow["n_students"], shallow["embed_dim_mean"], shallow["metric"]) == (2, 28.0, "val_acc")
    assert shallow["acc_mean"] == pytest.approx(0.65) and shallow["acc_high"] == 1.0  # clipped
    assert 0.65 - shallow["acc_low"] == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2), rel=2e-4)
    assert (got[0, 4]["n_students"], got[0, 4]["acc_mean"], got[0, 4]["acc_low"]) == (1, 0.65, None)
    confirmed = got[1, 2]  # t4 alone, its confirmed mean test accuracy in place of its val_acc 0.80
    assert confirmed["acc_mean"] == pytest.approx(0.76) and confirmed["metric"] == "test_acc (confirmed mean)"
    assert (confirmed["n_confirmed"], confirmed["cost_low"], confirmed["cost_high"]) == (1, pytest.approx(10**5.5), 1e6)
    deep = got[1, 4]  # t5 (0.90) and t6 (0.86)
    assert (deep["n_students"], deep["acc_mean"], deep["cost"]) == (2, pytest.approx(0.88), "flops")
    # four bins (edges 10^5, 10^5.25, 10^5.5, 10^5.75, 10^6): t1, t2 | t3 | t4 | t6, t5
    four = [(r["bin"], r["depth"], r["n_students"]) for r in wide_vs_deep(trial_rows(), (), OBJECTIVES)]
    assert four == [(0, 2, 2), (1, 4, 1), (2, 2, 1), (3, 4, 2)]
    # by params, the run's other cost: t1..t6 cost a tenth, the same bins
    assert len(wide_vs_deep(trial_rows(), (), [("val_acc", "max"), ("params", "min")], bins=2)) == 4
    assert cost_bins([3.0, 3.0], 4) == [(3.0, 3.0)] and wide_vs_deep([], (), OBJECTIVES) == []


# ---- on disk: the loader and the report's section ------------------------------------------------


def make_run(root: Path, study: bool = True, trials: list[dict] | None = None) -> RunPaths:
    paths = RunPaths.at(root / "run")
    meta = {"name": "run", "objectives": [list(o) for o in OBJECTIVES], "trials": 8, "started": 99.0}
    write_json(paths.store, RunPaths.META, meta)
    write_table(trial_rows() if trials is None else trials, paths.store, RunPaths.TRIALS, ("trial_id",))
    write_table(confirm_rows(), paths.store, RunPaths.CONFIRM, CONFIRM_COLUMNS)
    if study:
        write_table(study_rows(), paths.store, STUDY_FILE, FIRST)
    return paths


def test_loader_and_when_the_section_is_empty(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path).uri)
    assert len(load_study(run)) == sum(len(v) for v in STUDY.values())
    few = load_run(make_run(tmp_path / "few", study=False, trials=trial_rows()[:3]).uri)
    assert load_study(few) == [] and study_section_html(few) == ""  # no study, 3 completed trials
    assert study_section_markdown(few, tmp_path) == ""
    plain = load_run(make_run(tmp_path / "plain", study=False).uri)  # no study, 6 completed: wide-vs-deep only
    section = study_section_html(plain)
    assert WIDE_HEADING in section and RESOLUTION_HEADING not in section and "No study.parquet" in section
    write_table([{"trial_id": "t1", "status": "completed"}], few.paths.store, STUDY_FILE, ("trial_id",))
    with pytest.raises(KdsearchError, match=r"lacks the column\(s\) pos_embed, img_size, mode, seed, test_acc"):
        load_study(few)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study-report")
    write_report(load_run(make_run(root).uri), root / "report")
    return root / "report"


def test_the_report_shows_the_study_section(report: Path) -> None:
    from PIL import Image

    page, md = (report / "report.html").read_text(), (report / "report.md").read_text()
    for heading in (HEADING, RESOLUTION_HEADING, WINNERS_HEADING, WIDE_HEADING):
        level = "##" if heading == HEADING else "###"
        assert f"{level} {heading}\n" in md and f">{html.escape(heading)}</h" in page
    md_headings = re.findall(r"^#{2,3} (.*)$", md, re.M)
    assert len(md_headings) == len(re.findall(r"<h[23]>(.*?)</h[23]>", page))
    for heading in md_headings:  # a name, then what is measured
        assert re.search(r"\w: \w|\w for \w", heading), heading
    study = html.unescape(page.split(f"<h2>{HEADING}</h2>")[1])
    for text in (study, md.split(f"## {HEADING}")[1]):
        assert "3 studied students (learned, none, rope) at 12, 16, 24 px" in text
        assert "0.9200 [0.8206, 1.0000] clipped, n = 3" in text  # t3 fine-tuned at 12 px: its t interval clipped
        assert "0.5500 (n = 1: no interval), 1 failed" in text and "failed, n =" not in text
        assert "beyond noise" in text and "within noise" in text and "one seed: no interval" in text
        assert "test_acc (confirmed mean)" in text and "+0.1000" in text
    assert study.count("Plotly.newPlot") == 2 and 'id="study_resolution"' in study and 'id="study_wide"' in study
    assert '"dash":"dash"' in study and '"dash":"solid"' in study and '"text":["n=2"' in study
    assert "![accuracy against resolution](study_resolution.png)" in md and "![wide against deep]" in md
    for png in ("study_resolution.png", "study_wide_deep.png"):
        assert Image.open(report / png).size == (800, 560)


@needs(None if CHROMIUM else NO_CHROMIUM)
def test_the_study_section_renders_in_headless_chromium(report: Path) -> None:
    dom, errors = render(report / "report.html")
    assert errors == [] and "<title>ERROR" not in dom
    assert f"<h2>{HEADING}</h2>" in dom
    for div in ("study_resolution", "study_wide"):
        drawn = dom.split(f'id="{div}"', 1)[1].split("<table", 1)[0]  # the figure's div, up to its table
        assert 'class="main-svg"' in drawn and 'class="errorbars"' in drawn, div
    assert "stroke-dasharray" in dom.split('id="study_resolution"', 1)[1].split("<table", 1)[0]  # zero-shot dashed
