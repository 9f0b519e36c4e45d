"""`kdsearch space show`: a space file's dimensions, size, cost range and budgets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kdsearch.cli.console import print_json, wide_console


def space_show(
    space_file: Path = typer.Argument(..., help="A search-space YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    samples: int = typer.Option(
        2000, min=1, max=1_000_000, metavar="N", help="Random configs drawn to measure the share inside the budgets."
    ),
) -> None:
    """Print a space: its dimensions, how many students it holds, their FLOPs and params range."""
    from kdsearch.space.file import load_space
    from kdsearch.space.summary import summarize

    summary = summarize(load_space(space_file), samples=samples)
    if as_json:
        print_json(summary, indent=2)
        return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    console = wide_console()
    console.print(f"[bold]{s['name']}[/bold]  ({s['source']})")
    if s["description"]:
        console.print(s["description"])
    d, t = s["data"], s["teacher"]
    console.print(
        f"data: {d['name']} at {d['img_size']}px, {d['num_classes']} classes"
        + (f", root {d['root']}" if d["root"] else "")
        + (f", path {d['path']}" if d["path"] else "")
    )
    weights = t["checkpoint"] or ("timm pretrained" if t["pretrained"] else "trained by kdsearch")
    console.print(f"teacher: {t['model']} ({weights}); trials get its signal from: {', '.join(s['teacher_sources'])}")
    cache = s["teacher_cache"]
    if cache and cache["kind"] == "replay":
        console.print(
            f"teacher cache: a replay of every (image, epoch): {cache['bytes_per_view']} bytes x {cache['epochs']} epochs "
            f"= {cache['bytes_per_training_image']:,} bytes per training image, built once per search"
        )
    elif cache:
        console.print(
            f"teacher cache: its logits of each training image, {cache['bytes_per_training_image']:,} bytes each"
        )
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
    limits = [
        f"max {b['max_gflops']:g} GFLOPs" if b["max_gflops"] is not None else None,
        f"max {b['max_params']:,} params" if b["max_params"] is not None else None,
    ]
    limits = [x for x in limits if x] or ["none"]
    console.print(f"budget: {', '.join(limits)}; {b['share_inside']:.1%} of {b['samples']:,} sampled configs inside")
    objectives = ", ".join(f"{o['metric']} ({o['mode']}; {o['unit']})" for o in s["objectives"])
    sr = s["search"]
    console.print(
        f"objectives: {objectives}; sampler {sr['sampler']}, {sr['trials']} trials; per trial {s['resources']['cpus']:g} CPU, {s['resources']['gpus']:g} GPU"
    )
