"""Training a teacher or one student: `kdsearch teacher train` (the built-in teacher),
`kdsearch teacher finetune` (a pretrained timm model on the space's data, here or as a Ray task
on a cluster GPU) and `kdsearch trial` (one student, each dimension at its default unless --set)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from kdsearch.cli.console import err_console, print_json, wide_console
from kdsearch.errors import KdsearchError

if TYPE_CHECKING:
    from kdsearch.space.specs import TrialSpec
    from kdsearch.train.setup import TrialSetup


def teacher_train(
    space_file: Path = typer.Argument(..., help="A search-space YAML file whose teacher is kdsearch/digits_cnn."),
    force: bool = typer.Option(False, "--force", help="Train again even when the checkpoint exists."),
) -> None:
    """Train the space's built-in teacher on its data and save it where the space points."""
    from kdsearch.space.file import load_space
    from kdsearch.space.specs import BUILTIN_TEACHER
    from kdsearch.train.data import load_data
    from kdsearch.train.evaluation import evaluate
    from kdsearch.train.teacher import load_teacher

    space = load_space(space_file)
    if space.teacher.model != BUILTIN_TEACHER:
        raise KdsearchError(
            f"{space_file}: teacher.model: `teacher train` trains the built-in {BUILTIN_TEACHER}; "
            f"fine-tune {space.teacher.model} on this data with `kdsearch teacher finetune {space_file}`"
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


# the defaults are FinetuneRecipe's (tests/test_finetune.py holds them equal): written out, so
# `--help` imports no torch
def teacher_finetune(
    space_file: Path = typer.Argument(..., help="A search-space YAML file whose teacher is a timm model."),
    epochs: int = typer.Option(10, help="Epochs over the space's train split."),
    batch_size: int = typer.Option(128, help="Images per step."),
    lr: float = typer.Option(5e-4, help="AdamW's peak learning rate (the head's)."),
    warmup_epochs: float = typer.Option(1.0, help="Linear warmup from 0 over these epochs, then a cosine decay to 0."),
    weight_decay: float = typer.Option(0.05, help="AdamW's weight decay (none on biases and norms)."),
    layer_decay: float = typer.Option(0.75, help="A ViT's lr falls by this factor per block below the head; 1: off."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the cross-entropy."),
    seed: int = typer.Option(0, help="Seed of the new head and the batch order."),
    force: bool = typer.Option(False, "--force", help="Fine-tune again and replace the checkpoint when it exists."),
    address: str = typer.Option(
        None, help="Run as one Ray task with one GPU on this cluster [default: RAY_ADDRESS, else this machine]."
    ),
) -> None:
    """Fine-tune the space's timm teacher from its pretrained weights on the space's train split,
    with a new head for its classes, and save it where teacher.checkpoint points."""
    from kdsearch.space.file import load_space
    from kdsearch.train.finetune import FinetuneRecipe, FinetuneResult, check_finetunable, run_finetune, starting_point
    from kdsearch.train.teacher import save_teacher, teacher_meta

    space = load_space(space_file)
    recipe = FinetuneRecipe(epochs, batch_size, lr, weight_decay, warmup_epochs, layer_decay, label_smoothing, seed)
    if recipe.problems():
        raise KdsearchError(recipe.problems()[0])
    check_finetunable(space.teacher)
    path = Path(space.teacher.checkpoint)
    if path.exists() and not force:
        meta = teacher_meta(path)
        made = f"val_acc {meta['val_acc']:.4f} on {meta.get('data')}" if "val_acc" in meta else "not made by kdsearch"
        say(f"teacher {path} exists ({made}); --force fine-tunes again and replaces it")
        return
    starting_point(space.teacher, force)  # nothing to start from is said here, before any Ray starts
    if address or os.environ.get("RAY_ADDRESS"):
        from kdsearch.search.finetune_task import finetune_on_cluster

        result = finetune_on_cluster(space.teacher, space.data, recipe, force, address, say)
    else:
        for item in run_finetune(space.teacher, space.data, recipe, force):
            if isinstance(item, FinetuneResult):
                result = item
            else:
                say(item)
    save_teacher(result.state, path, result.meta)
    say(f"teacher saved to {path} (val_acc {result.meta['val_acc']:.4f}; {path.with_suffix('.yaml').name} beside it)")


def say(line: str) -> None:
    """One line on stderr as it is: no markup, no highlighting, never wrapped."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def trial(
    space_file: Path = typer.Argument(..., help="A search-space YAML file."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Fix a dimension: --set student.depth=4 (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as one JSON object on stdout."),
    workdir: Path = typer.Option(None, help="Where the weights go [default: runs/SPACE_NAME/trials/TIMESTAMP]."),
) -> None:
    """Run one trial locally: each dimension at its default unless --set; prints its metrics."""
    from kdsearch.space.file import load_space, parse_sets
    from kdsearch.space.specs import TeacherSource, teacher_source
    from kdsearch.train.data import load_data
    from kdsearch.train.teacher import load_teacher
    from kdsearch.train.trial import TrialSetup

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
    workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    setup = TrialSetup(workdir=workdir, data=data, teacher=teacher, cache_dir=run_dir / "cache", loader_workers=workers)
    result = _train_with_progress(spec, setup, transient=as_json)
    if as_json:
        print_json(result)
        return
    table = Table("metric", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    wide_console().print(table)


def _train_with_progress(spec: TrialSpec, setup: TrialSetup, transient: bool) -> dict[str, Any]:
    """`run_trial` under a progress bar on stderr (one step per epoch); its failures as one line."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kdsearch.train.trial import TrialDiverged, TrialFault, run_trial

    columns = [
        TextColumn("epoch {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err_console, transient=transient) as progress:
        task = progress.add_task("", total=spec.train.epochs)

        def report(m: dict) -> None:
            progress.update(
                task, completed=m["epoch"], description=f"val_acc {m['val_acc']:.4f}  loss {m['train_loss']:.4f}"
            )

        try:
            return run_trial(spec, setup, report)
        except TrialDiverged as e:
            raise KdsearchError(f"trial: {e}; lower train.lr or the recipe's weights") from None
        except TrialFault as e:  # out of memory, past train.max_minutes
            raise KdsearchError(f"trial: {e.line()}") from None
