"""Pick a student from a run's front, export it (config + weights + model card), load it back.

An exported folder holds everything needed to rebuild the model, like nanoGPT's checkpoint:

    student.yaml        architecture, image size, classes, the recipe it was trained with, its
                        metrics, FLOPs/MACs/params and how they were counted, the teacher and
                        data it came from, and the kdsearch/torch/timm versions
    model.safetensors   the weights
    model.onnx          the same model for deployment (one file, a dynamic batch axis), checked
                        with onnxruntime against PyTorch's logits on a few real images
    README.md           a short model card

`load_student(folder)` needs only those files: no run directory, no Ray, no Optuna.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.results.export_resolution import carried_row, carry_export, row_at
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths
from kdsearch.space.datasets import DATASETS
from kdsearch.space.flops import FlopCount, count_flops
from kdsearch.space.objectives import FLOPS_COUNTED, Pairs
from kdsearch.space.specs import DataSpec, RecipeSpec, StudentSpec, TeacherSpec, TrainSpec, TrialSpec, out_of_range

if TYPE_CHECKING:
    from torch import nn


def select_trial(
    trials: Sequence[dict[str, Any]],
    objectives: Pairs,
    trial_id: str | None = None,
    max_gflops: float | None = None,
    min_acc: float | None = None,
) -> dict[str, Any]:
    """The trial to export: an explicit completed one (or an early-stopped one, from its last
    checkpoint), the most accurate front member under
    `max_gflops`, or the cheapest front member reaching `min_acc`. KdsearchError otherwise."""
    if sum(x is not None for x in (trial_id, max_gflops, min_acc)) != 1:
        raise KdsearchError("export: give exactly one of --trial ID, --max-gflops X or --min-acc Y")
    completed = [r for r in trials if r["status"] == Status.COMPLETED]
    if not completed:
        raise KdsearchError("export: the run has no completed trial yet")
    if trial_id is not None:
        match = [r for r in trials if r["trial_id"] == trial_id]
        if not match:
            raise KdsearchError(
                f"--trial {trial_id}: no such trial; known: {', '.join(r['trial_id'] for r in trials[:12])}"
            )
        if match[0]["status"] not in (Status.COMPLETED, Status.STOPPED_EARLY) or not match[0].get("checkpoint"):
            raise KdsearchError(
                f"--trial {trial_id}: is {match[0]['status']} and has no saved weights; only completed trials "
                "and early-stopped ones with a checkpoint can be exported"
            )
        return match[0]
    front = front_rows(trials, objectives)
    if max_gflops is not None:
        ok = [r for r in front if r["flops"] <= max_gflops * 1e9]
        if not ok:
            raise KdsearchError(
                f"--max-gflops {max_gflops:g}: no front member is that cheap; the cheapest: {_nearest(front[:3])}"
            )
        return max(ok, key=lambda r: (r["val_acc"], -r["flops"]))
    if min_acc is not None and min_acc > 1:
        raise KdsearchError(f"--min-acc {min_acc:g}: give accuracy as a fraction in [0, 1], e.g. 0.95")
    ok = [r for r in front if r["val_acc"] >= min_acc]
    if not ok:
        best = sorted(front, key=lambda r: -r["val_acc"])[:3]
        raise KdsearchError(
            f"--min-acc {min_acc:g}: no front member is that accurate; the most accurate: {_nearest(best)}"
        )
    return min(ok, key=lambda r: (r["flops"], -r["val_acc"]))


def _nearest(rows: Sequence[dict[str, Any]]) -> str:
    return "; ".join(f"{r['trial_id']} ({r['flops'] / 1e9:.4g} GFLOPs, val_acc {r['val_acc']:.4f})" for r in rows)


def spec_of(row: dict[str, Any]) -> TrialSpec:
    """The TrialSpec of a trials.parquet row (its config columns)."""
    sections = {f.name for f in fields(TrialSpec)}
    return TrialSpec.from_dict({k: v for k, v in row.items() if k.split(".")[0] in sections and not _missing(v)})


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


ONNX_ATOL = 1e-4
"""The largest absolute difference allowed between onnxruntime's logits and PyTorch's."""
ONNX_CHECK_IMAGES = 8  # val images the exported graph is checked on (a batch unlike the one it was traced with)


def export_student(
    row: dict[str, Any],
    out: str | os.PathLike,
    run: RunPaths,
    objectives: Pairs = (),
    chosen_by: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> Path:
    """Export one trial: student.yaml, model.safetensors, model.onnx and README.md.

    Args:
        row: The trial's trials.parquet row (completed, or stopped early with a checkpoint).
        out: The folder to write to (made if missing; its files of these names replaced).
        run: The run holding the trial (a folder or a bucket: the weights are read from its storage).
        objectives: The run's objectives; the card's metrics hold each of them, val_acc,
            test_acc, best_val_acc and epochs.
        chosen_by: The rule that chose the trial (kdsearch.results.selection.choose_student),
            kept in the card as `chosen_by` and said in README.md.
        img_size: The resolution to export at (None: the trained one): the student carried there,
            fine-tuned when the run's study fine-tuned it there (kdsearch.results.export_resolution).

    Returns:
        The folder `out`.

    Raises:
        KdsearchError: The row's FLOPs are not its spec's, its weights are missing, onnxruntime's
            logits differ from PyTorch's by more than ONNX_ATOL, or `img_size` is off the patch grid.
    """
    out = Path(out)
    spec = spec_of(row)
    fc = count_flops(spec.student)
    if fc.flops != row["flops"]:
        raise KdsearchError(
            f"export: trial {row['trial_id']}'s recorded FLOPs ({row['flops']}) differ from its spec's ({fc.flops})"
        )
    weights = trial_weights(row, run)
    row = _at_checkpoint(row, run)
    carried = None
    if img_size is not None:
        spec, weights, carried = carry_export(spec, row, run, weights, img_size)
    model = student_from(spec, weights)
    if carried:
        row, fc = row_at(row, spec, model, carried), count_flops(spec.student)
    images, where = check_images(spec)
    test = test_accuracy(spec, model)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.onnx") as tmp:
        opset = write_onnx(model, tmp)
        diff = check_onnx(tmp, model, images)
    checked = {"images": len(images), "of": where, "max_abs_diff": diff, "tolerance": ONNX_ATOL}
    card = _card(spec, row, fc, test, opset, checked, run, objectives)
    card.update({k: v for k, v in (("chosen_by", chosen_by), ("carried", carried)) if v})
    write_text_atomic(out / "student.yaml", yaml.safe_dump(card, sort_keys=False))
    with atomic_path(out / "model.safetensors") as tmp:
        tmp.write_bytes(weights)
    write_text_atomic(out / "README.md", model_card(card))
    return out


def _card(
    spec: TrialSpec,
    row: dict[str, Any],
    fc: FlopCount,
    test: dict[str, Any],
    opset: int,
    checked: dict[str, Any],
    run: RunPaths,
    objectives: Pairs,
) -> dict[str, Any]:
    """student.yaml's content (format kdsearch-student/1): the spec, metrics, cost, the ONNX
    graph and how it was checked, the trial it came from, the versions that made it."""
    import timm
    import torch

    from kdsearch import __version__

    return {
        "format": "kdsearch-student/1",
        "student": asdict(spec.student),
        "recipe": asdict(spec.recipe),
        "train": asdict(spec.train),
        "data": asdict(spec.data),
        "teacher": asdict(spec.teacher),
        "metrics": {
            **{name: _float(row.get(name)) for name, _ in objectives},
            "val_acc": float(row["val_acc"]),
            "test_acc": test["test_acc"],
            "best_val_acc": _float(row.get("best_val_acc")),
            "epochs": int(row["epochs"]),
        },
        "test": test,
        "cost": {
            "flops": fc.flops,
            "macs": fc.macs,
            "params": fc.params,
            "gflops": fc.flops / 1e9,
            "counted": FLOPS_COUNTED,
        },
        "onnx": {
            "file": "model.onnx",
            "opset": opset,
            "input": "images: float32 (batch, channels, height, width), normalized as in training; batch is dynamic",
            "output": "logits: float32 (batch, classes)",
            "checked": checked,
        },
        "source": {"run": run.uri, "trial_id": row["trial_id"]},
        "versions": {"kdsearch": __version__, "torch": str(torch.__version__), "timm": str(timm.__version__)},
    }


def test_accuracy(spec: TrialSpec, model: Any) -> dict[str, Any]:
    """The student's accuracy on its data's held-out test split (which the search never read),
    with the split's size and origin; None with the reason when the data is not on this machine."""
    from kdsearch.train.data import load_test
    from kdsearch.train.evaluation import evaluate_test

    try:
        test = load_test(spec.data)
    except KdsearchError as e:
        return {"test_acc": None, "images": 0, "split": DATASETS[spec.data.name].test_split, "not_measured": str(e)}
    acc = evaluate_test(model, test)
    return {"test_acc": acc, "images": len(test), "split": DATASETS[spec.data.name].test_split}


def trial_weights(row: dict[str, Any], run: RunPaths) -> bytes:
    """The safetensors bytes a completed trial saved in the run's storage."""
    ckpt = row.get("checkpoint")  # relative to the run
    if not ckpt or not run.store.exists(ckpt):
        where = run.store.uri_of(ckpt) if ckpt else f"trial {row['trial_id']}'s checkpoint"
        raise KdsearchError(f"{where} is missing; the run is incomplete")
    return run.store.read_bytes(ckpt)


def student_from(spec: TrialSpec, weights: bytes) -> Any:
    """The student of `spec` with these safetensors weights, in eval mode."""
    from safetensors.torch import load

    from kdsearch.models.student import build_student

    model = build_student(spec.student)
    model.load_state_dict(load(weights))
    return model.eval()


def write_onnx(model: Any, path: str | os.PathLike) -> int:
    """Export a student (torch.onnx's dynamo exporter) to one self-contained ONNX file with a
    dynamic batch axis: input `images`, output `logits`; returns the opset.

    Attention goes through the explicit path (`q k^T + bias`, softmax, `@ v`: the same math as
    SDPA): the exporter cannot decompose SDPA with relpos' float mask and a symbolic batch.
    """
    import logging

    import torch

    from kdsearch.models.student import Attention

    model = copy.deepcopy(model).eval().cpu()
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    s = model.spec
    example = torch.zeros(2, s.in_chans, s.img_size, s.img_size)
    quiet = logging.getLogger("onnxscript")  # its optimizer warns about every Split it leaves unfolded
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    finally:
        quiet.setLevel(level)
    program.save(str(path), external_data=False)
    return int(next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")))


def check_onnx(path: str | os.PathLike, model: Any, images: Any) -> float:
    """The largest absolute difference between onnxruntime's logits (CPU) for `images` and the
    PyTorch model's; KdsearchError when it exceeds ONNX_ATOL."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.inference_mode():
        expected = model.eval().cpu()(images).numpy()
    diff = float(abs(got - expected).max())
    if not diff <= ONNX_ATOL:
        raise KdsearchError(
            f"export: model.onnx's logits differ from PyTorch's by up to {diff:.3g} on {len(images)} images "
            f"(allowed: {ONNX_ATOL:g}); the ONNX graph is not written"
        )
    return diff


def check_images(spec: TrialSpec) -> tuple[Any, str]:
    """ONNX_CHECK_IMAGES val images of the student's data, and what they are; seeded random
    images of its input shape when that data is not on this machine (said in the second item)."""
    import torch

    from kdsearch.train.data import load_data

    try:
        data = load_data(spec.data)
        return next(iter(data.val_batches(ONNX_CHECK_IMAGES)))[0], f"{spec.data.name} val images"
    except KdsearchError as e:
        s = spec.student
        g = torch.Generator().manual_seed(0)
        images = torch.randn(ONNX_CHECK_IMAGES, s.in_chans, s.img_size, s.img_size, generator=g)
        return images, f"random images ({spec.data.name} is not here: {e})"


def _at_checkpoint(row: dict[str, Any], run: RunPaths) -> dict[str, Any]:
    """A stopped trial whose weights are from an earlier epoch than its last (a checkpoint every
    k > 1 epochs): its metrics at that epoch, from epochs.parquet, so the card matches the weights."""
    at = row.get("checkpoint_epoch")
    if _missing(at) or int(at) == int(row["epochs"]):
        return row
    epoch = next((r for r in run.rows(RunPaths.EPOCHS) if r["trial_id"] == row["trial_id"] and r["epoch"] == at), {})
    return {**row, **{k: v for k, v in epoch.items() if k in row and k != "trial_id"}, "epochs": int(at)}


def _float(v: Any) -> float | None:
    return None if _missing(v) else float(v)


def model_card(card: dict[str, Any]) -> str:
    """README.md of an exported student, in Markdown, from its card (student.yaml's content)."""
    s, c, m, r = card["student"], card["cost"], card["metrics"], card["recipe"]
    token = ", with DeiT's distillation token (the two heads are averaged at inference)" if s["distill_token"] else ""
    return f"""# kdsearch student {card["source"]["trial_id"]}

A ViT student distilled by kdsearch from `{card["teacher"]["model"]}` on `{card["data"]["name"]}`.

| | |
|---|---|
| val accuracy | {m["val_acc"]:.4f} after {m["epochs"]} epochs (the split the search selected on) |
| test accuracy | {_test_line(card)} |
| FLOPs | {c["flops"]:,} ({c["gflops"]:.4g} GFLOPs), {c["macs"]:,} MACs |
| params | {c["params"]:,} |
| architecture | width {s["embed_dim"]}, depth {s["depth"]}, {s["num_heads"]} heads, MLP ratio {s["mlp_ratio"]:g}, patch {s["patch_size"]}, `{s["pos_embed"]}` positional encoding{token} |
| input | {s["in_chans"]} x {s["img_size"]} x {s["img_size"]}, {s["num_classes"]} classes |
| recipe | alpha {r["alpha"]:.3g}, temperature {r["temperature"]:.3g}, hard {r["hard_weight"]:.3g}, feature {r["feature_weight"]:.3g}, attention {r["attention_weight"]:.3g} |
{_chosen_line(card)}{carried_row(card)}
FLOPs are counted {c["counted"]}.

`model.onnx` (opset {card["onnx"]["opset"]}, dynamic batch axis; input `images`, output `logits`) was checked with
onnxruntime against PyTorch on {card["onnx"]["checked"]["images"]} {card["onnx"]["checked"]["of"]}: max abs difference of the logits
{card["onnx"]["checked"]["max_abs_diff"]:.2g} (allowed: {card["onnx"]["checked"]["tolerance"]:g}).

```python
import kdsearch
model = kdsearch.load_student("path/to/this/folder")   # eval mode; logits = model(images)

import onnxruntime                                        # or without PyTorch
session = onnxruntime.InferenceSession("path/to/this/folder/model.onnx")
logits = session.run(["logits"], {{"images": images}})[0]  # images: float32 numpy (batch, C, H, W)
```

Made with kdsearch {card["versions"]["kdsearch"]}, torch {card["versions"]["torch"]}, timm {card["versions"]["timm"]}.
"""


def _chosen_line(card: dict[str, Any]) -> str:
    """The card's "chosen by" row: the options as given and the rule they resolve to ("" without one)."""
    c = card.get("chosen_by")
    if not c:
        return ""
    resolved = ", ".join(c["where"]) or "no constraint"
    pick = f"; pick {c['pick']} among {c['candidates']} qualifying front members" if c.get("pick") else ""
    return f"| chosen by | `{c['rule']}` (resolved: {resolved}{pick}) |\n"


def _test_line(card: dict[str, Any]) -> str:
    t = card.get("test") or {}
    if t.get("test_acc") is None:
        return f"not measured ({t.get('not_measured', 'exported before kdsearch measured it')})"
    return f"{t['test_acc']:.4f} on {t['images']:,} held-out images ({t['split']}), never read by the search"


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The card (student.yaml) of an exported student's folder; KdsearchError when the folder
    holds none, or one that is not valid YAML or lacks a section of the spec or the metrics."""
    path = Path(folder) / "student.yaml"
    if not path.is_file():
        raise KdsearchError(f"{folder}: no student.yaml; not an exported kdsearch student")
    try:
        card = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as e:
        raise KdsearchError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); kdsearch export writes it") from None
    sections = ("student", "recipe", "train", "data", "teacher", "metrics")
    if not isinstance(card, dict) or not all(isinstance(card.get(s), dict) for s in sections):
        raise KdsearchError(f"{path}: not a kdsearch student card (it holds the mappings {', '.join(sections)})")
    return card


def load_student(folder: str | os.PathLike) -> nn.Module:
    """Rebuild an exported student from its folder alone; returns the model in eval mode."""
    from safetensors.torch import load_file

    from kdsearch.models.student import build_student

    card = read_card(folder)
    model = build_student(StudentSpec(**card["student"]))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def card_spec(card: dict[str, Any]) -> TrialSpec:
    """The TrialSpec recorded in an exported student's card (read by `read_card`)."""
    try:
        spec = TrialSpec(
            student=StudentSpec(**card["student"]),
            recipe=RecipeSpec(**card["recipe"]),
            train=TrainSpec(**card["train"]),
            data=DataSpec(**card["data"]),
            teacher=TeacherSpec(**card["teacher"]),
        )
        problems = [str(p) for p in spec.student.problems()] + out_of_range(spec.student, "student")
    except TypeError as e:  # an unknown key, or a value of the wrong type
        raise KdsearchError(f"student.yaml: not a kdsearch student card ({e})") from None
    if spec.data.name not in DATASETS:
        problems.append(f"data.name {spec.data.name!r} is not one of {', '.join(DATASETS)}")
    if problems:
        raise KdsearchError(f"student.yaml: the recorded student cannot be built: {problems[0]}")
    return spec
