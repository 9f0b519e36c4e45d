"""Reading a run: `kdsearch status` (progress and the front so far), `kdsearch pareto` (the
front, its hypervolume, pictures) and `kdsearch report` (one HTML page and its Markdown)."""

from __future__ import annotations

from pathlib import Path

import typer

from kdsearch.cli.console import Format, print_json, wide_console, write_csv
from kdsearch.errors import KdsearchError


def status(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """Progress and the front so far, from a run's files (while it runs or after); for a
    one-shot run, its stage first (supernet, screening or training) and that stage's time."""
    from kdsearch.results.hypervolume import run_reference
    from kdsearch.results.oneshot import run_stage
    from kdsearch.results.status import render_status, status_dict
    from kdsearch.results.tables import RunPaths, open_run

    paths = open_run(run)
    meta = paths.meta()
    if not {"objectives", "trials", "started"} <= set(meta):
        raise KdsearchError(
            f"{paths.store.uri_of(RunPaths.META)}: missing or incomplete; status reads the run's total and start"
        )
    trials, epochs = paths.rows(RunPaths.TRIALS), paths.rows(RunPaths.EPOCHS)
    objectives = [tuple(o) for o in meta["objectives"]]
    reference, why = run_reference(paths, meta, objectives)
    args = (trials, epochs, objectives, meta["trials"], meta["started"])
    ended = meta.get("ended")  # written when the search's experiment returns; absent while it runs
    stage = run_stage(paths, meta)  # None for a standard run
    if as_json:
        s = status_dict(*args, reference=reference, why_no_reference=why, ended=ended)
        print_json(s | {"oneshot": stage} if stage else s)
        return
    if stage:
        wide_console().print(stage["line"], soft_wrap=True)
    wide_console().print(render_status(*args, reference=reference, why_no_reference=why, ended=ended))


# --where and --pick of `pareto` (options as constants: the command's signature stays short)
PARETO_WHERE = typer.Option(
    [],
    "--where",
    metavar="EXPR",
    help="Keep the completed trials meeting EXPR (repeatable), then show the front of what is left: "
    "COLUMN OP VALUE on any objective, trials.parquet column or measured figure, OP one of <= < >= > == != "
    "(latency_ms<=5, params<2e6, student.pos_embed==rope). The hypervolume and pictures are of those trials too; "
    "none left: an empty table (and one line on stderr), exit 0.",
)
PARETO_PICK = typer.Option(
    None,
    "--pick",
    metavar="RULE",
    help="Print one front member: max:COLUMN, min:COLUMN or knee (the best trade-off: kdsearch.results.selection.knee).",
)


def pareto(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of all trials and the front."),
    html_out: Path = typer.Option(None, "--html", help="Write an interactive HTML plot (a trial's config on hover)."),
    objectives: str = typer.Option(
        None, "--objectives", help="Comma-separated, e.g. val_acc,params or val_acc,params:min [default: the run's]."
    ),
    where: list[str] = PARETO_WHERE,
    pick: str = PARETO_PICK,
) -> None:
    """The front of a run: its members, their architecture and recipe, and the hypervolume."""
    from kdsearch.cli.console import err_console
    from kdsearch.results.plots import plot_front
    from kdsearch.results.report import front_table, hypervolume, write_front_html
    from kdsearch.results.selection import empty_line, given_text, record_columns, restrict
    from kdsearch.results.status import render_front
    from kdsearch.results.tables import front_records, load_run, require_finished
    from kdsearch.space import objectives as objective_table

    r = load_run(run, objectives.split(",") if objectives else None)
    require_finished(r)
    if where or pick:  # the front of the trials meeting --where (an empty table when none does), or its --pick
        kept, chosen, _ = restrict(r, where, pick)
        if not chosen:
            err_console.print(empty_line(f"pareto {given_text(where, pick)}", r.trials), soft_wrap=True)
        r, rows = kept, front_records(chosen, r.objectives)
    else:
        rows = front_table(r)
    hv = hypervolume(r)
    if plot:
        plot_front(r.trials, r.objectives, plot, title=r.name)
    if html_out:
        write_front_html(r, html_out)
    if fmt is Format.json:
        units = {
            c: objective_table.get(c).unit for c in record_columns(r.objectives) if c in objective_table.OBJECTIVES
        }
        out = {
            "run": r.paths.uri,
            "objectives": r.objectives,
            "units": units,
            "hypervolume": hv.as_json(),
            "front": rows,
        }
        print_json(out)
    elif fmt is Format.csv:
        write_csv(rows, record_columns(r.objectives))
    else:
        console = wide_console()
        console.print(
            render_front(rows, f"Pareto front of {r.name}: " + ", ".join(f"{m} ({d})" for m, d in r.objectives))
        )
        console.print(hv.describe())


def report(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Folder for report.html, report.md and pictures [default: RUN/report; NAME-report for a URI].",
    ),
) -> None:
    """One self-contained HTML page (and the same as Markdown): the front, hypervolume over time,
    each encoding's front, parameter importances, failed and stopped trials."""
    from kdsearch.results.report import write_report
    from kdsearch.results.tables import load_run

    r = load_run(run)
    local = r.paths.store.local_path()
    page, md = write_report(r, out or (local / "report" if local else Path(f"{r.name}-report")))
    wide_console().print(f"report: {page}  markdown: {md}")
