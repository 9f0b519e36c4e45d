"""`kdsearch search`: run a search, then print its front (or why there is none) and, for an
interrupted search, the command that continues it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kdsearch.cli.console import err_console, wide_console
from kdsearch.errors import RunFailed

if TYPE_CHECKING:
    from kdsearch.results.tables import RunPaths


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
    track: list[str] = typer.Option(
        None,
        "--track",
        metavar="NAME",
        help="Log every trial to mlflow, wandb or tensorboard (repeatable or comma-separated) [default: the space's search.track].",
    ),
) -> None:
    """Run a multi-objective search: Ray Tune runs trials, Optuna chooses them."""
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
        track=track or None,
    )
    meta = result.paths.meta()
    _print_result(result, meta["objectives"], plot)
    _say_how_it_ended(result, meta["trials"], space_file, storage)


def _print_result(result: Any, objectives: list, plot: Path | None) -> None:
    """The front, the run and its picture on stdout; the run alone when no trial completed."""
    from kdsearch.results.status import render_front
    from kdsearch.results.tables import front_records

    run = result.paths
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


def _say_how_it_ended(result: Any, total: int, space_file: Path, storage: str) -> None:
    """For an interrupted search, how far it got and the command that continues it; RunFailed
    when the search finished and none of its trials trained."""
    from kdsearch.results.outcomes import untrained_summary

    run = result.paths
    if result.interrupted:
        completed = sum(1 for r in result.trials if r["status"] == "completed")
        err_console.print(
            f"stopped with {len(result.trials)} of {total} trials finished ({completed} completed); "
            f"continue with: kdsearch search {space_file} --name {run.name} --storage {storage} --resume",
            soft_wrap=True,
        )
    elif (untrained := untrained_summary(result.trials)) is not None:
        raise RunFailed(f"search {run.uri}: {untrained}")


def _front_picture(run: RunPaths, trials: list, objectives: list, plot: Path | None) -> str:
    """The front as a PNG: at --plot, else in the run (written here, then uploaded to a bucket)."""
    from kdsearch.results.plots import plot_front

    if plot is not None:
        return str(plot_front(trials, objectives, plot, title=run.name))
    local = run.store.local_path()
    if local is not None:
        return str(plot_front(trials, objectives, local / "front.png", title=run.name))
    with tempfile.TemporaryDirectory() as tmp:
        run.store.upload(plot_front(trials, objectives, Path(tmp) / "front.png", title=run.name), "front.png")
    return run.store.uri_of("front.png")
