"""An exported student: `kdsearch export` (config, weights, a checked ONNX graph and a model
card from a run's trial) and `kdsearch eval` (its accuracy measured again, val and test)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kdsearch.cli.console import print_json, wide_console
from kdsearch.errors import KdsearchError

if TYPE_CHECKING:
    from kdsearch.space.specs import DataSpec, TrialSpec


# --where and --pick of `export` (options as constants: the command's signature stays short)
EXPORT_WHERE = typer.Option(
    [],
    "--where",
    metavar="EXPR",
    help="Choose from the front of the completed trials meeting EXPR (repeatable): COLUMN OP VALUE on any "
    "objective, trials.parquet column or measured figure, OP one of <= < >= > == != (latency_ms<=5, params<2e6). "
    "--max-gflops X is flops<=X*1e9, --min-acc Y is val_acc>=Y; none meeting them: one line, exit 2.",
)
EXPORT_PICK = typer.Option(
    None,
    "--pick",
    metavar="RULE",
    help="Which qualifying front member: max:COLUMN, min:COLUMN or knee [default: min:flops with --min-acc alone, else max:val_acc].",
)


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
    where: list[str] = EXPORT_WHERE,
    pick: str = EXPORT_PICK,
    force: bool = typer.Option(False, "--force", help="Replace what --out already holds."),
    img_size: int = typer.Option(
        None,
        "--img-size",
        metavar="PX",
        help="Export at this input size (a multiple of the patch size): the student carried there, fine-tuned "
        "when `kdsearch study` fine-tuned it there, else zero-shot; FLOPs, ONNX check and accuracy at PX.",
    ),
) -> None:
    """Export a student: config, weights, an ONNX graph checked against them, and a model card
    (which records the rule that chose it). Give --trial alone, or any of --max-gflops,
    --min-acc, --where and --pick."""
    from kdsearch.results.export import export_student, read_card
    from kdsearch.results.selection import choose_student
    from kdsearch.results.tables import load_run

    if out.exists() and not out.is_dir():
        raise KdsearchError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an export" if (out / "student.yaml").exists() else "files"
        raise KdsearchError(f"--out {out}: already holds {what}; add --force to replace it, or choose another folder")
    r = load_run(run)
    row, chosen_by = choose_student(r, trial_id, max_gflops, min_acc, where, pick)
    folder = export_student(row, out, run=r.paths, objectives=r.objectives, chosen_by=chosen_by, img_size=img_size)
    card = read_card(folder)
    checked, test, cost = card["onnx"]["checked"], card["test"], card["cost"]
    carried = f", {card['carried']['how']}" if card.get("carried") else ""
    held_out = (
        f"test_acc {test['test_acc']:.4f} on {test['images']:,} held-out images"
        if test["test_acc"] is not None
        else "test_acc not measured: the data is not on this machine"
    )
    wide_console().print(
        f"exported trial {row['trial_id']}{carried} (val_acc {card['metrics']['val_acc']:.4f}, {held_out}, {cost['gflops']:.4g} GFLOPs, {cost['params']:,} params) to {folder}; "
        f"model.onnx matches PyTorch's logits on {checked['images']} {checked['of']} (max abs diff {checked['max_abs_diff']:.2g} <= {checked['tolerance']:g})"
    )


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
    from kdsearch.train.data import load_data, load_test
    from kdsearch.train.evaluation import evaluate, evaluate_test

    card = read_card(student)
    spec = card_spec(card)
    dspec = _eval_data(spec, data)
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
        print_json(result)
    else:
        wide_console().print(
            f"val_acc {acc:.4f} on {len(loaded.val):,} {dspec.name} val images (selected on; recorded at export: {recorded:.4f})\n"
            f"test_acc {test_acc:.4f} on {len(test):,} held-out test images ({DATASETS[dspec.name].test_split})"
        )


def _eval_data(spec: TrialSpec, data: str | None) -> DataSpec:
    """The data `eval --data` names (a dataset without a root, or a space file's data), else the
    student's own; KdsearchError when its images are not the size the student takes."""
    from kdsearch.space.datasets import DATASETS
    from kdsearch.space.specs import DataSpec

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
    return dspec
