"""`kdsearch confirm`: retrain front members with more seeds, then print what the seeds say
(means, 95% intervals, the confirmed front, which differences are noise)."""

from __future__ import annotations

import typer
from rich.table import Table

from kdsearch.cli.console import Format, err_console, print_json, wide_console, write_csv


def confirm(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    seeds: int = typer.Option(3, "--seeds", min=1, metavar="S", help="Seeds per member (its own seed + 1 .. + S)."),
    top: int = typer.Option(
        None, "--top", min=1, metavar="K", help="The front's K most accurate members [default: the whole front]."
    ),
    trial_ids: list[str] = typer.Option(
        None, "--trial", metavar="TRIAL_ID", help="Confirm this completed trial (repeatable) instead."
    ),
    address: str = typer.Option(
        None, "--address", help="Join a Ray cluster: 'auto' or ray://HOST:PORT [default: a local Ray]."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    track: list[str] = typer.Option(
        None,
        "--track",
        metavar="NAME",
        help="Log every retraining to mlflow, wandb or tensorboard (repeatable or comma-separated) [default: the space's search.track].",
    ),
) -> None:
    """Retrain the front's members with more seeds (a Ray search of its own) and measure each on the
    held-out test split: means, 95% intervals, the confirmed front and which differences are noise."""
    from kdsearch.results.confirm import confirm_summary, display_tables
    from kdsearch.results.tables import load_run
    from kdsearch.search.confirm import run_confirm

    run_confirm(
        run,
        seeds=seeds,
        top=top,
        trial_ids=trial_ids or (),
        address=address,
        say=err_console.print,
        track=track or None,
    )
    summary = confirm_summary(load_run(run))
    if fmt is Format.json:
        print_json(summary)
        return
    tables = display_tables(summary)
    if fmt is Format.csv:
        rows = [{k: v for k, v in m.items() if k != "seeds"} for m in summary["members"]]
        write_csv(rows, list(rows[0]) if rows else ["trial_id"])
        return
    console = wide_console()
    titles = {
        "members": f"Confirmed with {summary['seeds']} seeds: test accuracy on the held-out split "
        f"({summary['interval']})",
        "noise": f"Neighbours on the confirmed front ({summary['noise_rule']})",
        "encodings": "Each positional encoding's best member at or under each cost",
    }
    for key, title in titles.items():
        rows = tables[key]
        if rows:
            table = Table(*rows[0], title=title)
            for r in rows:
                table.add_row(*r.values())
            console.print(table)
    console.print(f"confirm.parquet: {load_run(run).paths.store.uri_of('confirm.parquet')}", soft_wrap=True)
