"""The `kdsearch` command: a typer front over the package.

Every user error (`KdsearchError`) becomes one line on stderr and exit code 2; typer's own
usage errors exit 2 as well. Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kdsearch.errors import KdsearchError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Search for small vision-transformer students distilled from a teacher.",
)
space_app = typer.Typer(no_args_is_help=True, help="Inspect search-space files.")
app.add_typer(space_app, name="space")


@space_app.command("show")
def space_show(
    space_file: Path = typer.Argument(..., help="A search-space YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    samples: int = typer.Option(2000, help="Random configs drawn to measure the share inside the budgets."),
) -> None:
    """Print a space: its dimensions, how many students it holds, their FLOPs and params range."""
    from kdsearch.space import load_space
    from kdsearch.summary import summarize

    summary = summarize(load_space(space_file), samples=samples)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    console = Console()
    console.print(f"[bold]{s['name']}[/bold]  ({s['source']})")
    if s["description"]:
        console.print(s["description"])
    d, t = s["data"], s["teacher"]
    console.print(f"data: {d['name']} at {d['img_size']}px, {d['num_classes']} classes" + (f", root {d['root']}" if d["root"] else ""))
    weights = t["checkpoint"] or ("timm pretrained" if t["pretrained"] else "trained by kdsearch")
    console.print(f"teacher: {t['model']} ({weights})")
    table = Table("dimension", "values", "count", "default")
    for dim in s["dimensions"]:
        style = None if dim["kind"] != "fixed" else "dim"
        count = "continuous" if dim["count"] is None else str(dim["count"])
        table.add_row(dim["name"], dim["values"], count, repr(dim["default"]), style=style)
    console.print(table)
    n = "infinitely many (a continuous dimension)" if s["architectures_continuous"] else f"{s['architectures']:,}"
    console.print(f"architectures: {n}")
    console.print(f"GFLOPs: {s['gflops']['min']:.4g} .. {s['gflops']['max']:.4g}  ({s['flops_unit']})")
    console.print(f"params: {s['params']['min']:,} .. {s['params']['max']:,}")
    b = s["budget"]
    limits = [f"max {b['max_gflops']:g} GFLOPs" if b["max_gflops"] is not None else None, f"max {b['max_params']:,} params" if b["max_params"] is not None else None]
    limits = [x for x in limits if x] or ["none"]
    console.print(f"budget: {', '.join(limits)}; {b['share_inside']:.1%} of {b['samples']:,} sampled configs inside")
    objectives = ", ".join(f"{o['metric']} ({o['mode']})" for o in s["objectives"])
    sr = s["search"]
    console.print(f"objectives: {objectives}; sampler {sr['sampler']}, {sr['trials']} trials; per trial {s['resources']['cpus']:g} CPU, {s['resources']['gpus']:g} GPU")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (without the program name) is for tests."""
    try:
        app(args=argv, prog_name="kdsearch")
    except KdsearchError as e:
        print(f"kdsearch: error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
