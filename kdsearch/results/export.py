"""Pick a student from a run's front, export it (config + weights + model card), load it back.

An exported folder holds everything needed to rebuild the model, like nanoGPT's checkpoint:

    student.yaml        architecture, image size, classes, the recipe it was trained with, its
                        metrics, FLOPs/MACs/params and how they were counted, the teacher and
                        data it came from, and the kdsearch/torch/timm versions
    model.safetensors   the weights
    README.md           a short model card

`load_student(folder)` needs only those files: no run directory, no Ray, no Optuna.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths
from kdsearch.space.flops import count_flops
from kdsearch.space.objectives import FLOPS_COUNTED, Pairs
from kdsearch.space.specs import DataSpec, RecipeSpec, StudentSpec, TeacherSpec, TrainSpec, TrialSpec


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


def export_student(row: dict[str, Any], out: str | os.PathLike, run: RunPaths, objectives: Pairs = ()) -> Path:
    """Write student.yaml, model.safetensors and README.md for a trials.parquet row of `run`
    (a folder or a bucket: the weights are read from its storage); the card's metrics hold
    val_acc, best_val_acc, epochs and every one of the run's `objectives`."""
    import timm
    import torch

    from kdsearch import __version__

    out = Path(out)
    spec = spec_of(row)
    fc = count_flops(spec.student)
    if fc.flops != row["flops"]:
        raise KdsearchError(
            f"export: trial {row['trial_id']}'s recorded FLOPs ({row['flops']}) differ from its spec's ({fc.flops})"
        )
    ckpt = row["checkpoint"]  # relative to the run
    if not run.store.exists(ckpt):
        raise KdsearchError(f"export: {run.store.uri_of(ckpt)} is missing; the run is incomplete")
    weights = run.store.read_bytes(ckpt)
    row = _at_checkpoint(row, run)
    card = {
        "format": "kdsearch-student/1",
        "student": asdict(spec.student),
        "recipe": asdict(spec.recipe),
        "train": asdict(spec.train),
        "data": asdict(spec.data),
        "teacher": asdict(spec.teacher),
        "metrics": {
            **{name: _float(row.get(name)) for name, _ in objectives},
            "val_acc": float(row["val_acc"]),
            "best_val_acc": _float(row.get("best_val_acc")),
            "epochs": int(row["epochs"]),
        },
        "cost": {
            "flops": fc.flops,
            "macs": fc.macs,
            "params": fc.params,
            "gflops": fc.flops / 1e9,
            "counted": FLOPS_COUNTED,
        },
        "source": {"run": run.uri, "trial_id": row["trial_id"]},
        "versions": {"kdsearch": __version__, "torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "student.yaml", yaml.safe_dump(card, sort_keys=False))
    with atomic_path(out / "model.safetensors") as tmp:
        tmp.write_bytes(weights)
    write_text_atomic(out / "README.md", model_card(card))
    return out


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
    s, c, m, r = card["student"], card["cost"], card["metrics"], card["recipe"]
    token = ", with DeiT's distillation token (the two heads are averaged at inference)" if s["distill_token"] else ""
    return f"""# kdsearch student {card["source"]["trial_id"]}

A ViT student distilled by kdsearch from `{card["teacher"]["model"]}` on `{card["data"]["name"]}`.

| | |
|---|---|
| val accuracy | {m["val_acc"]:.4f} after {m["epochs"]} epochs |
| FLOPs | {c["flops"]:,} ({c["gflops"]:.4g} GFLOPs), {c["macs"]:,} MACs |
| params | {c["params"]:,} |
| architecture | width {s["embed_dim"]}, depth {s["depth"]}, {s["num_heads"]} heads, MLP ratio {s["mlp_ratio"]:g}, patch {s["patch_size"]}, `{s["pos_embed"]}` positional encoding{token} |
| input | {s["in_chans"]} x {s["img_size"]} x {s["img_size"]}, {s["num_classes"]} classes |
| recipe | alpha {r["alpha"]:.3g}, temperature {r["temperature"]:.3g}, hard {r["hard_weight"]:.3g}, feature {r["feature_weight"]:.3g}, attention {r["attention_weight"]:.3g} |

FLOPs are counted {c["counted"]}.

```python
import kdsearch
model = kdsearch.load_student("path/to/this/folder")   # eval mode; logits = model(images)
```

Made with kdsearch {card["versions"]["kdsearch"]}, torch {card["versions"]["torch"]}, timm {card["versions"]["timm"]}.
"""


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "student.yaml"
    if not path.is_file():
        raise KdsearchError(f"{folder}: no student.yaml; not an exported kdsearch student")
    return yaml.safe_load(path.read_text())


def load_student(folder: str | os.PathLike):
    """Rebuild an exported student from its folder alone; returns the model in eval mode."""
    from safetensors.torch import load_file

    from kdsearch.models.student import build_student

    card = read_card(folder)
    model = build_student(StudentSpec(**card["student"]))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def card_spec(card: dict[str, Any]) -> TrialSpec:
    """The TrialSpec recorded in an exported student's card."""
    return TrialSpec(
        student=StudentSpec(**card["student"]),
        recipe=RecipeSpec(**card["recipe"]),
        train=TrainSpec(**card["train"]),
        data=DataSpec(**card["data"]),
        teacher=TeacherSpec(**card["teacher"]),
    )
