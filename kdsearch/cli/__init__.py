"""The `kdsearch` command: a typer front over the package.

Every user error (`KdsearchError`) becomes one line on stderr and its exit code (2; 1 for a
`RunFailed` search); typer's own usage errors exit 2 as well; Ctrl-C, one line and 130 (a
search's Tune stage returns what finished instead). Nothing here holds logic the
Python API lacks. This module makes the app, registers every command in the order `--help`
lists them, and turns errors into lines; each command lives in the module named for its job:

    console.py     the consoles every command writes with, the output formats, CSV
    space.py       space show
    train.py       teacher train, teacher finetune (here, or one Ray task on a cluster GPU), trial
    search.py      search
    inspection.py  status, pareto, report (reading a run)
    compare.py     compare (runs side by side)
    export.py      export, eval (an exported student)
    confirm.py     confirm
    study.py       study (encodings across resolutions)
    measure.py     measure

A command imports what it needs inside its function, so `kdsearch --help` loads neither Ray
nor torch.
"""

from __future__ import annotations

import sys

import typer

from kdsearch.cli import compare, confirm, export, inspection, measure, search, space, study, train
from kdsearch.errors import KdsearchError

# rich_markup_mode=None: help texts are plain, so "[default: ...]" in them is shown, not taken for markup
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Search for small vision-transformer students distilled from a teacher.",
)
space_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect search-space files.")
app.add_typer(space_app, name="space")
teacher_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Train or inspect a space's teacher.")
app.add_typer(teacher_app, name="teacher")


def _print_version(value: bool) -> None:
    if value:
        import kdsearch

        typer.echo(f"kdsearch {kdsearch.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print kdsearch's version and exit."
    ),
) -> None:
    """Search for small vision-transformer students distilled from a teacher."""


space_app.command("show")(space.space_show)
teacher_app.command("train")(train.teacher_train)
teacher_app.command("finetune")(train.teacher_finetune)
app.command("trial")(train.trial)
app.command("search")(search.search)
app.command("status")(inspection.status)
app.command("pareto")(inspection.pareto)
app.command("report")(inspection.report)
app.command("compare")(compare.compare)
app.command("export")(export.export)
app.command("confirm")(confirm.confirm)
app.command("study")(study.study)
app.command("measure")(measure.measure)
app.command("eval")(export.eval_)


INTERRUPTED = 130  # the shell's exit status for a command ended by SIGINT (128 + 2)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Args:
        argv: The arguments without the program name; None reads them from `sys.argv`.
    """
    try:
        app(args=argv, prog_name="kdsearch")
    except KdsearchError as e:
        # one line even when the input echoed holds a line break (\r, \x85, \u2028 as well as \n)
        print(" ".join(f"kdsearch: error: {e}".splitlines()), file=sys.stderr)
        sys.exit(e.exit_code)
    except SystemExit as e:
        # typer ends a command that Ctrl-C interrupted outside Tune's fit (which returns what finished
        # instead) with exit 130, silently: what is written stays written (a search's stages and
        # tables resume with --resume; confirm and study compute only what is missing)
        if e.code == INTERRUPTED:
            print("kdsearch: interrupted (Ctrl-C); what was written is kept", file=sys.stderr)
        raise
