"""`kdsearch compare` on two real runs: the session's small search and a copy of it with trials
dropped (written back through kdsearch's own table writer) and a worse reference in its run.json."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from kdsearch.results.plots import TAB10
from kdsearch.results.tables import TRIAL_COLUMNS, RunPaths, write_json, write_table
from tests.browser import CHROMIUM, NO_CHROMIUM, chromium
from tests.helpers import needs, run_cli
from tests.helpers import run_dir as local_run_dir

SECOND_FLOPS_REFERENCE = 5e6  # worse than small_run's (its budget, 4e6): the shared reference takes it


@pytest.fixture(scope="module")
def runs(small_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """small_run's folder and "second": the same run less its most accurate completed trial and
    every trial of one encoding, judged against a flops reference of 5e6."""
    first = local_run_dir(small_run[0])
    second = tmp_path_factory.mktemp("compare") / "second"
    shutil.copytree(first, second)
    assert not (second / "trials.parts").exists()  # a finished run: the table is one file
    paths = RunPaths.at(second)
    rows = paths.rows(RunPaths.TRIALS)
    done = [r for r in rows if r["status"] == "completed"]
    best = max(done, key=lambda r: (r["val_acc"], -r["flops"]))
    dropped_pe = next(r["student.pos_embed"] for r in done if r["trial_id"] != best["trial_id"])
    kept = [r for r in rows if r["trial_id"] != best["trial_id"] and r["student.pos_embed"] != dropped_pe]
    assert any(r["status"] == "completed" for r in kept)
    write_table(kept, paths.store, RunPaths.TRIALS, TRIAL_COLUMNS)
    meta = paths.meta()
    assert meta["hypervolume_reference"] == {"val_acc": 0.0, "flops": 4e6}
    meta["hypervolume_reference"]["flops"] = SECOND_FLOPS_REFERENCE
    write_json(paths.store, RunPaths.META, meta)
    return first, second


def cli_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert run_cli(args) == 0
    return json.loads(capsys.readouterr().out)


def staircase(rows: pd.DataFrame, flops_reference: float) -> float:
    """The normalized hypervolume of (val_acc max, flops min) by hand: the area under the front's
    steps in the box from (acc 0, flops reference) to (acc 1, flops 0), flops scaled by the reference."""
    pts = sorted((f / flops_reference, a) for a, f in zip(rows.val_acc, rows.flops) if f <= flops_reference)
    area, best = 0.0, 0.0
    for (x, a), (x_next, _) in zip(pts, [*pts[1:], (1.0, 0.0)]):
        best = max(best, a)  # the front's accuracy at cost x: the best at that cost or below
        area += (x_next - x) * best
    return area


def test_hypervolumes_against_the_shared_reference_equal_paretos(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = runs
    out = cli_json(["compare", str(first), str(second), "--format", "json"], capsys)
    assert out["reference"] == {"val_acc": 0.0, "flops": SECOND_FLOPS_REFERENCE}  # the worst of the two
    a, b = out["runs"]
    assert (a["run"], b["run"]) == (first.name, "second")
    # second's own reference is the shared one: pareto's figure, exactly
    assert b["hypervolume"] == cli_json(["pareto", str(second), "--format", "json"], capsys)["hypervolume"]["value"]
    # the first against the shared (not its own) reference: the staircase's area by hand
    trials = {p: pd.read_parquet(p / "trials.parquet") for p in runs}
    for r, path in ((a, first), (b, second)):
        done = trials[path][trials[path].status == "completed"]
        assert r["hypervolume"] == pytest.approx(staircase(done, SECOND_FLOPS_REFERENCE), rel=1e-12)
        assert (r["completed"], r["trials"]) == (len(done), len(trials[path]))
    assert a["hypervolume"] > b["hypervolume"] > 0  # the second lost its most accurate trial
    # stated as the first's own reference: the first's figure is pareto's, exactly
    stated = cli_json(
        ["compare", str(first), str(second), "--format", "json", "--reference", "val_acc=0,flops=4e6"], capsys
    )
    assert stated["reference"] == {"val_acc": 0.0, "flops": 4e6} and stated["reference_from"] == "stated"
    own = cli_json(["pareto", str(first), "--format", "json"], capsys)
    assert stated["runs"][0]["hypervolume"] == own["hypervolume"]["value"]
    assert stated["runs"][0]["front"] == [r["trial_id"] for r in own["front"]]
    assert stated["runs"][0]["front_size"] == len(own["front"])


def test_best_member_per_encoding_and_the_formats(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_json(["compare", *map(str, runs), "--format", "json"], capsys)
    for r, path in zip(out["runs"], runs):
        done = pd.read_parquet(path / "trials.parquet").query("status == 'completed'")
        expected = {}
        for pe, group in done.groupby("student.pos_embed"):
            top = group.sort_values(["val_acc", "flops", "trial_id"], ascending=[False, True, True]).iloc[0]
            expected[pe] = {"trial_id": top.trial_id, "val_acc": top.val_acc, "flops": top.flops}
        assert r["best_by_encoding"] == expected
    assert set(out["runs"][1]["best_by_encoding"]) < set(out["runs"][0]["best_by_encoding"])  # one encoding dropped
    assert run_cli(["compare", *map(str, runs), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == sum(len(r["best_by_encoding"]) for r in out["runs"])
    assert {(r["run"], r["pos_embed"], r["trial_id"]) for r in rows} == {
        (r["run"], pe, b["trial_id"]) for r in out["runs"] for pe, b in r["best_by_encoding"].items()
    }
    assert float(rows[0]["hypervolume"]) == out["runs"][0]["hypervolume"]
    assert run_cli(["compare", *map(str, runs)]) == 0
    table = capsys.readouterr().out
    assert "second" in table and "front_size" in table and "(val_acc 0, flops 5e6;" in table
    # one run alone is allowed: its own front and encodings
    alone = cli_json(["compare", str(runs[0]), "--format", "json"], capsys)
    assert alone["runs"][0] == {**out["runs"][0], "hypervolume": alone["runs"][0]["hypervolume"]}
    own = cli_json(["pareto", str(runs[0]), "--format", "json"], capsys)["hypervolume"]
    assert alone["reference"] == own["reference"] and alone["runs"][0]["hypervolume"] == own["value"]


def test_runs_that_cannot_be_compared(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = runs
    assert run_cli(["compare", str(first), str(tmp_path / "nope"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "nope: no such run directory" in err[0] and "is not a kdsearch run" in err[1]
    other = tmp_path / "other"
    shutil.copytree(second, other)
    paths = RunPaths.at(other)
    meta = paths.meta()
    meta["objectives"] = [["val_acc", "max"], ["params", "min"]]
    write_json(paths.store, RunPaths.META, meta)
    assert run_cli(["compare", str(first), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_acc (max), params (min) differ from" in err and "flops (min)" in err
    assert run_cli(["compare", str(first), str(second), "--reference", "val_acc=0"]) == 2
    assert "--reference: no value for flops" in capsys.readouterr().err


@needs(None if CHROMIUM else NO_CHROMIUM)
def test_the_fronts_in_a_png_and_in_headless_chromium(runs: tuple[Path, Path], tmp_path: Path) -> None:
    png, page, shot = tmp_path / "fronts.png", tmp_path / "fronts.html", tmp_path / "shot.png"
    assert run_cli(["compare", *map(str, runs), "--plot", str(png), "--html", str(page)]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (800, 560)
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 24)}
    blue, orange = (tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in TAB10[:2])
    assert blue in colours and orange in colours  # a colour per run
    dom = chromium(page, "--dump-dom")
    errors = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "Uncaught" in ln)]
    assert errors == [] and "<title>kdsearch compare: " in dom.stdout and "<title>ERROR" not in dom.stdout
    assert dom.stdout.count('class="main-svg"') >= 2  # plotly drew the figure
    # a trace group per run: its trials and its front, each in the legend under the run's name
    legend = [t.split(">", 1)[1].split("<", 1)[0] for t in dom.stdout.split('class="legendtext"')[1:]]
    assert legend == [f"{runs[0].name}: trials", runs[0].name, "second: trials", "second"]
    assert dom.stdout.count('class="trace scatter') == 4
    assert dom.stdout.count('class="groups"') == 2  # the legend's groups: one per run
    assert chromium(page, f"--screenshot={shot}").returncode == 0
    with Image.open(shot) as img:
        pixels = {c for _, c in img.convert("RGB").getcolors(1 << 24)}
    assert len(pixels) > 50 and blue in pixels and orange in pixels  # drawn, both runs' colours on screen
