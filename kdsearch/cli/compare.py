"""`kdsearch compare RUN [RUN ...]`: runs side by side (kdsearch.results.compare): each run's
front size and hypervolume against one shared reference, each encoding's best member per run,
as a table, CSV or JSON, and the fronts on one PNG and one self-contained HTML page.

One run is allowed (its front and per-encoding best members alone: the table is still of use).
Every run that cannot be read gets its own line on stderr, then the command exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from kdsearch.cli.console import Format, print_json, wide_console, write_csv
from kdsearch.errors import KdsearchError


def _read_runs(locations: list[str]) -> list:
    """Every run loaded and with a finished trial; one stderr line per run that is not, then exit 2."""
    from kdsearch.results.tables import load_run, require_finished

    runs, bad = [], []
    for location in locations:
        try:
            r = load_run(location)
            require_finished(r)
            runs.append(r)
        except KdsearchError as e:
            bad.append(" ".join(str(e).splitlines()))
    for line in bad:
        print(f"kdsearch: error: {line}", file=sys.stderr)
    if bad:
        raise typer.Exit(2)
    return runs


def _cell(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_tables(comparison: dict) -> None:
    from kdsearch.results.compare import encoding_rows, reference_line, summary_rows

    console = wide_console()
    for title, rows in (
        ("Runs: " + ", ".join(f"{m} ({d})" for m, d in comparison["objectives"]), summary_rows(comparison)),
        ("Each encoding's best member per run (most accurate, ties to the cheaper)", encoding_rows(comparison)),
    ):
        table = Table(title=title, title_justify="left")
        for key in rows[0] if rows else ["none"]:
            table.add_column(key, justify="left" if key in ("run", "pos_embed", "trial_id") else "right")
        for r in rows:
            table.add_row(*(_cell(v) for v in r.values()))
        console.print(table)
    console.print(reference_line(comparison))
    for r in comparison["runs"]:
        if r["why_no_hypervolume"]:
            console.print(f"{r['run']}: no hypervolume ({r['why_no_hypervolume']})")


def compare(
    runs: list[str] = typer.Argument(
        ..., metavar="RUN", help="Runs: folders (runs/NAME) or URIs (s3://BUCKET/runs/NAME)."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the runs' fronts, a colour per run."),
    html_out: Path = typer.Option(None, "--html", help="Write one self-contained interactive HTML page."),
    reference: str = typer.Option(
        None,
        "--reference",
        help="The shared reference point, raw units, e.g. val_acc=0,flops=2e7 "
        "[default: per objective the worst of the runs' own references].",
    ),
) -> None:
    """Runs side by side: each run's front and hypervolume against one shared reference, and
    per positional encoding each run's best member."""
    from kdsearch.results.compare import (
        compare_runs,
        flat_rows,
        parse_reference,
        shared_objectives,
        write_compare_html,
        write_compare_png,
    )

    loaded = _read_runs(runs)
    stated = parse_reference(reference, shared_objectives(loaded)) if reference else None
    comparison = compare_runs(loaded, stated)
    if plot:
        write_compare_png(loaded, comparison, plot)
    if html_out:
        write_compare_html(loaded, comparison, html_out)
    if fmt is Format.json:
        print_json(comparison)  # strict JSON: a missing figure is null
    elif fmt is Format.csv:
        rows = flat_rows(comparison)
        write_csv(rows, list(rows[0]))
    else:
        _print_tables(comparison)
