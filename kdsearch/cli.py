"""The `kdsearch` command: a typer front over the package.

Every user error (`KdsearchError`) becomes one line on stderr and exit code 2; typer's own
usage errors exit 2 as well. Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kdsearch.errors import KdsearchError, RunFailed


def wide_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when writing to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


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
err_console = wide_console(stderr=True)


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


@space_app.command("show")
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
        typer.echo(json.dumps(summary, indent=2))
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


@teacher_app.command("train")
def teacher_train(
    space_file: Path = typer.Argument(..., help="A search-space YAML file whose teacher is kdsearch/digits_cnn."),
    force: bool = typer.Option(False, "--force", help="Train again even when the checkpoint exists."),
) -> None:
    """Train the space's built-in teacher on its data and save it where the space points."""
    from kdsearch.space.file import load_space
    from kdsearch.space.specs import BUILTIN_TEACHER
    from kdsearch.train.data import load_data
    from kdsearch.train.loop import evaluate
    from kdsearch.train.teacher import load_teacher

    space = load_space(space_file)
    if space.teacher.model != BUILTIN_TEACHER:
        raise KdsearchError(
            f"{space_file}: teacher.model: only the built-in {BUILTIN_TEACHER} is trained by kdsearch; "
            f"fine-tune {space.teacher.model} with timm's train script and give its checkpoint"
        )
    path = Path(space.teacher.checkpoint)
    if path.exists() and not force:
        data = load_data(space)
        acc = evaluate(load_teacher(space, data=data), data)
        err_console.print(f"teacher {path} exists (val_acc {acc:.4f}); --force trains it again")
        return
    if force and path.exists():
        path.unlink()
    load_teacher(space, train_if_missing=True, log=err_console.print)


@app.command("trial")
def trial(
    space_file: Path = typer.Argument(..., help="A search-space YAML file."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Fix a dimension: --set student.depth=4 (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as one JSON object on stdout."),
    workdir: Path = typer.Option(None, help="Where the weights go [default: runs/SPACE_NAME/trials/TIMESTAMP]."),
) -> None:
    """Run one trial locally: each dimension at its default unless --set; prints its metrics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kdsearch.space.file import load_space, parse_sets
    from kdsearch.space.specs import TeacherSource, teacher_source
    from kdsearch.train.data import load_data
    from kdsearch.train.teacher import load_teacher
    from kdsearch.train.trial import TrialDiverged, TrialFault, run_trial

    space = load_space(space_file)
    spec = space.default_spec(parse_sets(space, set_))
    run_dir = Path("runs") / space.name
    workdir = (workdir or run_dir / "trials" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    data = load_data(space)
    needs_teacher = teacher_source(spec.recipe) is not TeacherSource.NONE
    teacher = load_teacher(space, train_if_missing=True, log=err_console.print, data=data) if needs_teacher else None
    s = spec.student
    err_console.print(
        f"student: D {s.embed_dim}, depth {s.depth}, heads {s.num_heads}, mlp {s.mlp_ratio:g}, patch {s.patch_size}, "
        f"{s.pos_embed}{', distillation token' if s.distill_token else ''}; recipe: {spec.recipe}"
    )
    columns = [
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err_console, transient=as_json) as progress:
        task = progress.add_task("", total=spec.train.epochs)

        def report(m: dict) -> None:
            progress.update(
                task, completed=m["epoch"], description=f"val_acc {m['val_acc']:.4f}  loss {m['train_loss']:.4f}"
            )

        try:
            workers = max(0, min(8, (os.cpu_count() or 1) - 1))
            result = run_trial(
                spec, report, workdir, data=data, teacher=teacher, cache_dir=run_dir / "cache", loader_workers=workers
            )
        except TrialDiverged as e:
            raise KdsearchError(f"trial: {e}; lower train.lr or the recipe's weights") from None
        except TrialFault as e:  # out of memory, past train.max_minutes
            raise KdsearchError(f"trial: {e.line()}") from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table("metric", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    wide_console().print(table)


@app.command("search")
def search(
    space_file: Path = typer.Argument(..., help="A search-space YAML file."),
    trials: int = typer.Option(
        None,
        "--trials",
        min=1,
        metavar="N",
        help="Trials the run is to have [default: the space's search.trials]; with --resume, more than it has extends it.",
    ),
    address: str = typer.Option(
        None, "--address", help="Join a Ray cluster: 'auto' or ray://HOST:PORT [default: a local Ray]."
    ),
    name: str = typer.Option(None, "--name", help="The run's name [default: the space's name]."),
    storage: str = typer.Option(
        "runs",
        "--storage",
        help="Where runs live: a folder, or a URI such as s3://BUCKET/runs (any pyarrow filesystem).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run NAME after its driver died (or extend it: --trials N)."
    ),
    from_run: str = typer.Option(
        None, "--from", help="Start the sampler from an earlier run's trials (its folder or URI; the same data)."
    ),
    plot: Path = typer.Option(None, "--plot", help="Write the front as a PNG here [default: RUN/front.png]."),
) -> None:
    """Run a multi-objective search: Ray Tune runs trials, Optuna chooses them."""
    from kdsearch.results.outcomes import untrained_summary
    from kdsearch.results.status import render_front
    from kdsearch.results.tables import front_records
    from kdsearch.search.run import run_search

    result = run_search(
        space_file,
        trials=trials,
        address=address,
        name=name,
        storage=storage,
        resume=resume,
        from_run=from_run,
        say=err_console.print,
        console=err_console,
    )
    run = result.paths
    meta = run.meta()
    objectives = meta["objectives"]
    console = wide_console()
    if result.front:
        picture = _front_picture(run, result.trials, objectives, plot)
        title = "Pareto front (" + ", ".join(f"{m} {d}" for m, d in objectives) + ")"
        console.print(render_front(front_records(result.front, objectives), title))
        console.print(f"run: {run.uri}  (trials.parquet, epochs.parquet, study.db)", soft_wrap=True)
        console.print(f"front picture: {picture}", soft_wrap=True)
    else:
        ended = "yet" if result.interrupted else "in this search"
        console.print(f"run: {run.uri}  (no trial has completed {ended})", soft_wrap=True)
    if result.interrupted:
        completed = sum(1 for r in result.trials if r["status"] == "completed")
        err_console.print(
            f"stopped with {len(result.trials)} of {meta['trials']} trials finished ({completed} completed); "
            f"continue with: kdsearch search {space_file} --name {run.name} --storage {storage} --resume",
            soft_wrap=True,
        )
    elif (untrained := untrained_summary(result.trials)) is not None:
        raise RunFailed(f"search {run.uri}: {untrained}")


@app.command("status")
def status(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as one JSON object."),
) -> None:
    """Progress and the front so far, from a run's files (while it runs or after)."""
    from kdsearch.results.hypervolume import run_reference
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
    if as_json:
        typer.echo(json.dumps(status_dict(*args, reference=reference, why_no_reference=why), default=str))
        return
    wide_console().print(render_status(*args, reference=reference, why_no_reference=why))


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("pareto")
def pareto(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of all trials and the front."),
    html_out: Path = typer.Option(None, "--html", help="Write an interactive HTML plot (a trial's config on hover)."),
    objectives: str = typer.Option(
        None, "--objectives", help="Comma-separated, e.g. val_acc,params or val_acc,params:min [default: the run's]."
    ),
) -> None:
    """The front of a run: its members, their architecture and recipe, and the hypervolume."""
    from kdsearch.results.plots import plot_front
    from kdsearch.results.report import front_table, hypervolume, write_front_html
    from kdsearch.results.status import render_front
    from kdsearch.results.tables import load_run, require_finished
    from kdsearch.space import objectives as objective_table

    r = load_run(run, objectives.split(",") if objectives else None)
    require_finished(r)
    rows = front_table(r)
    hv = hypervolume(r)
    if plot:
        plot_front(r.trials, r.objectives, plot, title=r.name)
    if html_out:
        write_front_html(r, html_out)
    if fmt is Format.json:
        units = {c: objective_table.get(c).unit for c in rows[0] if c in objective_table.OBJECTIVES}
        out = {
            "run": r.paths.uri,
            "objectives": r.objectives,
            "units": units,
            "hypervolume": hv.as_json(),
            "front": rows,
        }
        typer.echo(json.dumps(out, default=str))
    elif fmt is Format.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        console = wide_console()
        console.print(
            render_front(rows, f"Pareto front of {r.name}: " + ", ".join(f"{m} ({d})" for m, d in r.objectives))
        )
        console.print(hv.describe())


@app.command("report")
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


@app.command("export")
def export(
    run: str = typer.Argument(..., help="A run: its folder (runs/NAME) or URI (s3://BUCKET/runs/NAME)."),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write student.yaml, model.safetensors, model.onnx and README.md to."
    ),
    trial_id: str = typer.Option(
        None,
        "--trial",
        metavar="TRIAL_ID",
        help="Export this trial (completed, or stopped early: its last checkpoint).",
    ),
    max_gflops: float = typer.Option(
        None, "--max-gflops", min=0, metavar="GFLOPS", help="The most accurate front member under this many GFLOPs."
    ),
    min_acc: float = typer.Option(
        None,
        "--min-acc",
        min=0,
        max=1,
        metavar="ACC",
        help="The cheapest front member with at least this val accuracy.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace what --out already holds."),
) -> None:
    """Export a student: config, weights, an ONNX graph checked against them, and a model card.
    Give exactly one of --trial, --max-gflops or --min-acc."""
    from kdsearch.results.export import export_student, read_card, select_trial
    from kdsearch.results.tables import load_run

    if out.exists() and not out.is_dir():
        raise KdsearchError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an export" if (out / "student.yaml").exists() else "files"
        raise KdsearchError(f"--out {out}: already holds {what}; add --force to replace it, or choose another folder")
    r = load_run(run)
    row = select_trial(r.trials, r.objectives, trial_id=trial_id, max_gflops=max_gflops, min_acc=min_acc)
    folder = export_student(row, out, run=r.paths, objectives=r.objectives)
    card = read_card(folder)
    checked, test = card["onnx"]["checked"], card["test"]
    held_out = (
        f"test_acc {test['test_acc']:.4f} on {test['images']:,} held-out images"
        if test["test_acc"] is not None
        else "test_acc not measured: the data is not on this machine"
    )
    wide_console().print(
        f"exported trial {row['trial_id']} (val_acc {row['val_acc']:.4f}, {held_out}, {row['flops'] / 1e9:.4g} GFLOPs, {row['params']:,} params) to {folder}; "
        f"model.onnx matches PyTorch's logits on {checked['images']} {checked['of']} (max abs diff {checked['max_abs_diff']:.2g} <= {checked['tolerance']:g})"
    )


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Runtime(str, Enum):
    torch = "torch"
    onnx = "onnx"


@app.command("confirm")
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
) -> None:
    """Retrain the front's members with more seeds (a Ray search of its own) and measure each on the
    held-out test split: means, 95% intervals, the confirmed front and which differences are noise."""
    from kdsearch.results.confirm import confirm_summary, display_tables
    from kdsearch.results.tables import load_run
    from kdsearch.search.confirm import run_confirm

    run_confirm(run, seeds=seeds, top=top, trial_ids=trial_ids or (), address=address, say=err_console.print)
    summary = confirm_summary(load_run(run))
    if fmt is Format.json:
        typer.echo(json.dumps(summary, default=str))
        return
    tables = display_tables(summary)
    if fmt is Format.csv:
        import csv

        rows = [{k: v for k, v in m.items() if k != "seeds"} for m in summary["members"]]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["trial_id"])
        writer.writeheader()
        writer.writerows(rows)
        return
    console = wide_console()
    titles = {
        "members": f"Confirmed with {summary['seeds']} seeds: test accuracy on the held-out split",
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


@app.command("measure")
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
) -> None:
    """Latency, throughput and peak memory of a run's students on this machine, from their saved
    weights; written to the run's measured.parquet (one row per trial, device and runtime)."""
    from kdsearch.results.measured import FIGURES, check_device, measure_run
    from kdsearch.results.tables import load_run
    from kdsearch.space import objectives as objective_table

    check_device(device.value, runtime.value)
    r = load_run(run)
    rows = measure_run(r, device.value, trial_ids, runtime.value, say=err_console.print)
    if fmt is Format.json:
        units = {f: objective_table.get(f).unit for f in FIGURES}
        typer.echo(json.dumps({"run": r.paths.uri, "units": units, "measured": rows}, default=str))
    elif fmt is Format.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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


@app.command("eval")
def eval_(
    student: Path = typer.Argument(..., help="An exported student folder."),
    data: str = typer.Option(
        None,
        "--data",
        help="A space file whose data to use, or a dataset that needs no root (digits) [default: the student's own data].",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Re-measure an exported student's accuracy on the val split (what the search selected on)
    and on the held-out test split (what no search ever read)."""
    from kdsearch.results.export import card_spec, load_student, read_card
    from kdsearch.space.datasets import DATASETS
    from kdsearch.space.specs import DataSpec
    from kdsearch.train.data import load_data, load_test
    from kdsearch.train.loop import evaluate, evaluate_test

    card = read_card(student)
    spec = card_spec(card)
    dspec = spec.data
    if data in DATASETS and not DATASETS[data].needs_root:
        dspec = DataSpec(name=data, img_size=spec.student.img_size)
    elif data:
        from kdsearch.space.file import load_space

        dspec = load_space(data).data
    if dspec.img_size != spec.student.img_size:
        raise KdsearchError(
            f"--data {data}: images are {dspec.img_size}px but the student takes {spec.student.img_size}px"
        )
    loaded = load_data(dspec)
    if loaded.num_classes != spec.student.num_classes or loaded.in_chans != spec.student.in_chans:
        raise KdsearchError(
            f"--data {data}: {loaded.num_classes} classes x {loaded.in_chans} channels, the student has {spec.student.num_classes} x {spec.student.in_chans}"
        )
    model = load_student(student)
    test = load_test(dspec)
    acc, test_acc = evaluate(model, loaded), evaluate_test(model, test)
    recorded = card["metrics"]["val_acc"]
    result = {
        "student": str(student),
        "data": dspec.name,
        "val_acc": acc,
        "test_acc": test_acc,
        "recorded_val_acc": recorded,
        "val_images": len(loaded.val),
        "test_images": len(test),
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        wide_console().print(
            f"val_acc {acc:.4f} on {len(loaded.val):,} {dspec.name} val images (selected on; recorded at export: {recorded:.4f})\n"
            f"test_acc {test_acc:.4f} on {len(test):,} held-out test images ({DATASETS[dspec.name].test_split})"
        )


def _front_picture(run, trials: list, objectives: list, plot: Path | None) -> str:
    """The front as a PNG: at --plot, else in the run (written here, then uploaded to a bucket)."""
    import tempfile

    from kdsearch.results.plots import plot_front

    if plot is not None:
        return str(plot_front(trials, objectives, plot, title=run.name))
    local = run.store.local_path()
    if local is not None:
        return str(plot_front(trials, objectives, local / "front.png", title=run.name))
    with tempfile.TemporaryDirectory() as tmp:
        run.store.upload(plot_front(trials, objectives, Path(tmp) / "front.png", title=run.name), "front.png")
    return run.store.uri_of("front.png")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (without the program name) is for tests."""
    try:
        app(args=argv, prog_name="kdsearch")
    except KdsearchError as e:
        # one line even when the input echoed holds a line break (\r, \x85, \u2028 as well as \n)
        print(" ".join(f"kdsearch: error: {e}".splitlines()), file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
