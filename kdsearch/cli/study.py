"""`kdsearch study`: each encoding's best student carried to other resolutions, zero-shot and
fine-tuned, then the table of what it found (kdsearch.search.study, kdsearch.results.study)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from kdsearch.cli.console import Format, err_console, print_json, wide_console, write_csv
from kdsearch.errors import KdsearchError


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KdsearchError(
            f"--resolutions {text}: give image sizes in pixels, comma-separated, e.g. 12,16,24"
        ) from None
    if not sizes or min(sizes) < 1:
        raise KdsearchError(f"--resolutions {text}: give image sizes of at least 1 pixel, e.g. 12,16,24")
    return sizes


def study(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    resolutions: str = typer.Option(
        ..., "--resolutions", metavar="PX,PX,...", help="Image sizes to study, in pixels (e.g. 12,16,24)."
    ),
    finetune_epochs: int = typer.Option(
        0,
        "--finetune-epochs",
        min=0,
        metavar="E",
        help="Also fine-tune E epochs at each size [default: zero-shot only].",
    ),
    seeds: int = typer.Option(
        3, "--seeds", min=1, metavar="S", help="Fine-tunings per student and size (its seed + 1 .. + S)."
    ),
    trial_ids: list[str] = typer.Option(
        None,
        "--trial",
        metavar="TRIAL_ID",
        help="Study this completed trial (repeatable) instead of each encoding's best.",
    ),
    address: str = typer.Option(
        None, "--address", help="Join a Ray cluster: 'auto' or ray://HOST:PORT [default: a local Ray]."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
) -> None:
    """Carry each positional encoding's best student (or the trials named) to other image sizes
    and measure it on the val and test splits there: zero-shot, and after a short fine-tune with
    several seeds. Rows go to the run's study.parquet; a second call computes only what is missing."""
    from kdsearch.results.study import load_study, study_summary
    from kdsearch.results.tables import RunPaths, load_run
    from kdsearch.search.study import run_study

    run_study(
        run,
        resolutions=_sizes(resolutions),
        finetune_epochs=finetune_epochs,
        seeds=seeds,
        trial_ids=trial_ids or (),
        address=address,
        say=err_console.print,
    )
    loaded = load_run(run)
    rows = study_table(study_summary(load_study(loaded)))
    if fmt is Format.json:
        print_json(rows)
        return
    if fmt is Format.csv:
        write_csv(rows, list(rows[0]) if rows else ["trial_id"])
        return
    table = Table(
        *(rows[0] if rows else ["trial_id"]),
        title="Test accuracy at each image size (mean [95% t interval] over the seeds)",
    )
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console = wide_console()
    console.print(table)
    console.print(f"study.parquet: {loaded.paths.store.uri_of(RunPaths.RESOLUTIONS)}", soft_wrap=True)


def study_table(summary: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per (trial, resolution): the zero-shot and the fine-tuned test accuracy, printed."""
    from kdsearch.results.study import ZERO_SHOT

    cells: dict[tuple, dict[str, str]] = {}
    for s in sorted(summary, key=lambda s: (s["pos_embed"], s["trial_id"], s["img_size"])):
        row = cells.setdefault(
            (s["trial_id"], s["img_size"]),
            {
                "encoding": str(s["pos_embed"]),
                "trial": str(s["trial_id"]),
                "px": f"{s['img_size']}" + (" (trained)" if s["img_size"] == s["trained_img_size"] else ""),
                "MFLOPs": f"{s['flops'] / 1e6:.3g}" if s.get("flops") is not None else "",
                "zero-shot": "",
                "fine-tuned": "",
            },
        )
        row["zero-shot" if s["mode"] == ZERO_SHOT else "fine-tuned"] = _interval(s)
    return list(cells.values())


def _interval(s: dict[str, Any]) -> str:
    mean = s.get("test_acc_mean")
    if mean is None:
        return "failed"
    if s.get("test_acc_low") is None:
        return f"{mean:.4f}" + (f" (n={s['n']})" if s.get("n", 1) > 1 else "")
    return f"{mean:.4f} [{s['test_acc_low']:.4f}, {s['test_acc_high']:.4f}] (n={s['n']})"
