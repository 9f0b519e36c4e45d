"""`kdsearch measure`: latency, throughput and peak memory of a run's students on this
machine, under PyTorch or onnxruntime, written to the run's measured.parquet."""

from __future__ import annotations

from enum import Enum

import typer
from rich.table import Table

from kdsearch.cli.console import Format, err_console, print_json, wide_console, write_csv


class Device(str, Enum):
    """Where `measure` runs the students."""

    cpu = "cpu"
    cuda = "cuda"


class Runtime(str, Enum):
    """What runs them: PyTorch, or the exported ONNX graph under onnxruntime."""

    torch = "torch"
    onnx = "onnx"


def measure(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    device: Device = typer.Option(Device.cpu, "--device", help="cpu or cuda."),
    trial_ids: list[str] = typer.Option(
        [],
        "--trial",
        metavar="TRIAL_ID",
        help="Measure this completed trial (repeatable); without it, every front member.",
    ),
    runtime: Runtime = typer.Option(
        Runtime.torch, "--runtime", help="torch, or onnx: the exported graph run by onnxruntime on the CPU."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    where: list[str] = typer.Option(
        [],
        "--where",
        metavar="EXPR",
        help="Measure the front of the completed trials meeting EXPR (repeatable): COLUMN OP VALUE on any objective, "
        "trials.parquet column or figure measured before, OP one of <= < >= > == != (params<2e6, student.pos_embed==rope).",
    ),
    pick: str = typer.Option(
        None, "--pick", metavar="RULE", help="Measure one front member: max:COLUMN, min:COLUMN or knee."
    ),
) -> None:
    """Latency, throughput and peak memory of a run's students on this machine, from their saved
    weights; written to the run's measured.parquet (one row per trial, device and runtime)."""
    from kdsearch.results.measured import FIGURES, check_device, measure_run
    from kdsearch.results.tables import load_run
    from kdsearch.space import objectives as objective_table

    check_device(device.value, runtime.value)
    r = load_run(run)
    rows = measure_run(r, device.value, trial_ids, runtime.value, say=err_console.print, where=where, pick=pick)
    if fmt is Format.json:
        units = {f: objective_table.get(f).unit for f in FIGURES}
        print_json({"run": r.paths.uri, "units": units, "measured": rows})
    elif fmt is Format.csv:
        write_csv(rows, list(rows[0]))
    else:
        objs = [objective_table.get(f) for f in FIGURES]
        table = Table("trial_id", "device", "runtime", *(o.heading for o in objs), title=f"measured: {r.name}")
        for row in rows:
            table.add_row(row["trial_id"], row["device_name"], row["runtime"], *(o.show(row[o.name]) for o in objs))
        console = wide_console()
        console.print(table)
        console.print(
            f"latency at batch 1, throughput and inference memory at batch {rows[0]['batch']}; "
            f"written to {r.paths.store.uri_of('measured.parquet')}",
            soft_wrap=True,
        )
