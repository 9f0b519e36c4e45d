"""Inspecting and exporting a real small run: pareto, report, export, load_student, eval."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kdsearch
from kdsearch.models.student import build_student
from kdsearch.results.export import spec_of
from kdsearch.train.data import count_test_images_read, load_data, load_test
from tests.browser import CHROMIUM, NO_CHROMIUM, render
from tests.helpers import needs, run_cli
from tests.helpers import run_dir as local_run_dir


@pytest.fixture(scope="module")
def run_dir(small_run) -> Path:
    return local_run_dir(small_run[0])


@pytest.fixture(scope="module")
def trials(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "trials.parquet")


def test_pareto_formats(run_dir: Path, small_run, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["pareto", str(run_dir), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["trial_id"] for r in out["front"]] == [r["trial_id"] for r in small_run[0].front]
    hv = out["hypervolume"]
    assert 0 < hv["value"] <= 1 and hv["reference"] == {"val_acc": 0.0, "flops": 0.004e9}  # worst and the budget
    assert run_cli(["pareto", str(run_dir), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[0].startswith("trial_id,val_acc,flops,macs,params,patch_size,embed_dim")
        and len(lines) == len(out["front"]) + 1
    )
    assert out["units"]["flops"].startswith("FLOPs per image at inference")
    assert run_cli(["pareto", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert f"hypervolume {hv['value']:.4f} of the box from the reference (val_acc 0, flops 4e6)" in table
    assert run_cli(["pareto", str(run_dir), "--objectives", "val_acc,params", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["objectives"] == [["val_acc", "max"], ["params", "min"]]
    # an objective of the table that this run never recorded: one line, not a traceback
    assert run_cli(["pareto", str(run_dir), "--objectives", "val_acc,latency_ms"]) == 2
    assert "the run recorded no latency_ms; it has val_acc, flops, macs, params" in capsys.readouterr().err


def test_pareto_plot_is_an_image_of_the_expected_size(run_dir: Path, tmp_path: Path) -> None:
    png, page = tmp_path / "front.png", tmp_path / "front.html"
    assert run_cli(["pareto", str(run_dir), "--plot", str(png), "--html", str(page)]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (800, 560)
        assert len(set(img.convert("L").tobytes())) > 10  # not a blank canvas
    text = page.read_text()
    assert "student.pos_embed" in text and "Plotly" in text


def test_bad_runs_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["pareto", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(run_dir, empty)
    (empty / "trials.parquet").unlink()
    assert run_cli(["pareto", str(empty)]) == 2
    assert "no finished trial" in capsys.readouterr().err
    assert run_cli(["report", str(empty)]) == 2
    capsys.readouterr()
    assert run_cli(["export", str(run_dir), "--max-gflops", "1e-9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no front member is that cheap; the cheapest:" in err
    assert run_cli(["export", str(run_dir), "--min-acc", "1.0", "--out", str(tmp_path / "x")]) == 2
    assert "the most accurate:" in capsys.readouterr().err
    assert run_cli(["export", str(run_dir), "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_loads_in_a_fresh_process(
    run_dir: Path, trials: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best = trials[trials.status == "completed"].sort_values("val_acc").iloc[-1]
    out = tmp_path / "student"
    assert run_cli(["export", str(run_dir), "--trial", best.trial_id, "--out", str(out)]) == 0
    said_at_export = capsys.readouterr().out
    assert f"exported trial {best.trial_id}" in said_at_export
    assert {p.name for p in out.iterdir()} == {"student.yaml", "model.safetensors", "model.onnx", "README.md"}
    card = kdsearch.results.export.read_card(out)
    assert card["cost"]["flops"] == best.flops == kdsearch.count_flops(kdsearch.StudentSpec(**card["student"])).flops
    assert card["metrics"]["val_acc"] == best.val_acc and "FlopCounterMode" in card["cost"]["counted"]
    # the trained model, rebuilt here from the run's own checkpoint
    spec = spec_of(best.to_dict())
    trained = build_student(spec.student)
    trained.load_state_dict(load_file(run_dir / best.checkpoint))
    trained.eval()
    data = load_data(spec.data)
    x = torch.cat([b[0] for b in data.val_batches(512)])
    with torch.no_grad():
        expected = trained(x)
    # the export, loaded with nothing but its folder, in a fresh Python process
    code = f"""
import sys, torch, kdsearch
from kdsearch.train.data import load_data
from kdsearch.space.specs import DataSpec
model = kdsearch.load_student({str(out)!r})
assert 'ray' not in sys.modules
data = load_data(DataSpec(img_size=16))
x = torch.cat([b[0] for b in data.val_batches(512)])
y = torch.cat([b[1] for b in data.val_batches(512)])
with torch.no_grad():
    logits = model(x)
torch.save({{'logits': logits, 'acc': (logits.argmax(-1) == y).sum().item() / len(y)}}, {str(tmp_path / "out.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=0)
    assert got["acc"] == pytest.approx(best.val_acc, abs=1e-9)
    read_before = count_test_images_read()
    assert run_cli(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["val_acc"] == pytest.approx(best.val_acc, abs=1e-9)
    # and the held-out test split, which the search never read, measured beside it
    test = load_test(spec.data)
    assert evaluated["test_images"] == len(test) == count_test_images_read() - read_before
    x_test = torch.stack([test[i][0] for i in range(len(test))])
    y_test = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        test_acc = (trained(x_test).argmax(-1) == y_test).float().mean().item()
    assert evaluated["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    assert card["metrics"]["test_acc"] == pytest.approx(test_acc, abs=1e-6) and card["test"]["images"] == 360
    assert f"test_acc {test_acc:.4f} on 360 held-out images" in " ".join(said_at_export.split())
    assert "| test accuracy | " in (out / "README.md").read_text()
    assert run_cli(["eval", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"val_acc {best.val_acc:.4f}" in said and f"test_acc {test_acc:.4f} on {len(test):,} held-out" in said


def test_export_picks_from_the_front(run_dir: Path, small_run, tmp_path: Path) -> None:
    front = small_run[0].front
    cheapest, best = front[0], max(front, key=lambda r: r["val_acc"])
    assert (
        run_cli(["export", str(run_dir), "--max-gflops", str(cheapest["flops"] / 1e9), "--out", str(tmp_path / "a")])
        == 0
    )
    assert kdsearch.results.export.read_card(tmp_path / "a")["source"]["trial_id"] == cheapest["trial_id"]
    assert run_cli(["export", str(run_dir), "--min-acc", str(best["val_acc"]), "--out", str(tmp_path / "b")]) == 0
    assert kdsearch.results.export.read_card(tmp_path / "b")["source"]["trial_id"] == best["trial_id"]


def test_export_does_not_replace_an_export_without_force(
    run_dir: Path, small_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    front = small_run[0].front
    first, other = front[0], front[-1]
    out = tmp_path / "student"
    assert run_cli(["export", str(run_dir), "--trial", first["trial_id"], "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run_cli(["export", str(run_dir), "--trial", other["trial_id"], "--out", str(out)]) == 2
    assert "already holds an export; add --force to replace it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing the user had is touched
    assert run_cli(["export", str(run_dir), "--trial", other["trial_id"], "--out", str(out), "--force"]) == 0
    assert kdsearch.results.export.read_card(out)["source"]["trial_id"] == other["trial_id"]
    (tmp_path / "file").write_text("x")
    assert run_cli(["export", str(run_dir), "--trial", first["trial_id"], "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_version_and_help_say_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kdsearch {kdsearch.__version__}"
    assert run_cli(["search", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # the help wraps lines
    assert "[default: a local Ray]" in text and "[default: the space's name]" in text and " ." not in text


# ---- the HTML report in a real browser ---------------------------------------------------------


@needs(None if CHROMIUM else NO_CHROMIUM)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    assert run_cli(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    assert {"report.html", "report.md", "front.png", "pe_fronts.png"} <= {p.name for p in tmp_path.iterdir()}
    md = (tmp_path / "report.md").read_text()
    assert "## Front members" in md and "## Failed and early-stopped trials" in md and "Hypervolume" in md
    assert "## Throughput" in md and "| trial_id | epochs | images_per_second | data_wait_share |" in md
    dom, errors = render(tmp_path / "report.html")
    assert errors == []
    assert "<title>kdsearch report" in dom and "<title>ERROR" not in dom
    assert dom.count('class="main-svg"') >= 2 * 4  # front, encodings, hypervolume and importance plots drawn
    # the check can fail: a page whose script throws is caught
    broken = tmp_path / "broken.html"
    broken.write_text(
        (tmp_path / "report.html").read_text().replace("</body>", "<script>undefinedFunction()</script></body>")
    )
    _, errors = render(broken)
    assert errors


def test_a_finished_search_records_its_end_and_status_shows_its_duration(
    run_dir: Path, trials: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["started"] < trials["finished_at"].max() <= meta["ended"] <= meta["started"] + 3600
    assert run_cli(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["elapsed_seconds"] == pytest.approx(meta["ended"] - meta["started"]) and status["ended_at"]
