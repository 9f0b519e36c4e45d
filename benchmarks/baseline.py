"""The search a user would write by hand without kdsearch: Ray Tune + OptunaSearch, the teacher
run live on every batch, no early stopping, Ray's defaults.

    .venv/bin/python benchmarks/baseline.py [--trials N] [--epochs N] [--seed S] [--out DIR]

It searches the same students on the same data as `search_spaces/digits_quick.yaml`: the same
dimensions, the same teacher checkpoint, the same train/val split and the same optimizer. Only
two things come from kdsearch, so that both searches build identical architectures and share
one x-axis: the student (`kdsearch.build_student`) and its exact FLOPs (`kdsearch.count_flops`).
(Also `picklable`, the work-around any user needs for NSGA-II on Optuna 5.1: without it Ray
cannot pickle the searcher and the Tuner fails before its first trial.)
Everything a search adds is left out on purpose: the teacher's logits are not cached (it runs on
every batch), workers are fresh per trial (Ray's default `reuse_actors=False`), the data is loaded
in each trial, no trial is stopped early, and configs over the budget train anyway (the user
filters them afterwards).

Writes DIR/baseline.parquet: one row per trial with val_acc, flops, its start and end time
(seconds since the search began), and the teacher images it ran.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from kdsearch.space.samplers import picklable

ROOT = Path(__file__).resolve().parents[1]

DIMS = {
    "embed_dim": [32, 48, 64, 96],
    "depth": (1, 6),
    "num_heads": [2, 4],
    "mlp_ratio": [1.0, 2.0, 3.0],
    "patch_size": [2, 4],
    "pos_embed": ["learned", "sincos", "relpos", "rope", "cpe", "none"],
    "distill_token": [False, True],
    "alpha": (0.0, 1.0),
    "temperature": (1.0, 8.0),
    "hard_weight": [0.0, 0.5],
}


def define(trial: optuna.Trial) -> None:
    """The space as a user writes it for OptunaSearch (define-by-run)."""
    for name, values in DIMS.items():
        if isinstance(values, list):
            trial.suggest_categorical(name, values)
        elif isinstance(values[0], int):
            trial.suggest_int(name, *values)
        else:
            trial.suggest_float(name, *values, log=name == "temperature")


def digits(img_size: int = 16) -> tuple[torch.Tensor, ...]:
    """The digits split kdsearch's data layer uses (the same indices), loaded by hand."""
    from kdsearch.space.specs import DataSpec
    from kdsearch.train.data import load_data

    data = load_data(DataSpec(img_size=img_size))
    return data.train.x, data.train.y, data.val.x, data.val.y


def train_one(config: dict, teacher_path: str, epochs: int, t0: float) -> None:
    """One trial: load data and teacher, train the student with the teacher live, report per epoch."""
    from safetensors.torch import load_file

    from kdsearch import StudentSpec, build_student, count_flops
    from kdsearch.models.digits_cnn import DigitsCNN

    torch.set_num_threads(1)
    started = time.time() - t0
    x, y, xv, yv = digits()
    teacher = DigitsCNN()
    teacher.load_state_dict(load_file(teacher_path))
    teacher.eval()
    keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "pos_embed", "distill_token")
    spec = StudentSpec(img_size=16, in_chans=1, num_classes=10, **{k: config[k] for k in keys})
    flops = count_flops(spec).flops
    torch.manual_seed(0)
    model = build_student(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=min(0.3, 2 / epochs))
    alpha, temp, hard = config["alpha"], config["temperature"], config["hard_weight"]
    teacher_images = 0
    g = torch.Generator().manual_seed(0)
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 63, 64):
            idx = order[i : i + 64]
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                t_logits = teacher(xb)  # the teacher, live, on every batch
            teacher_images += len(yb)
            out = model(xb)  # with a distillation token (training): the class head's and its head's logits
            cls, kd = out if isinstance(out, tuple) else (out, out)
            soft = (
                F.kl_div(
                    F.log_softmax(kd / temp, -1),
                    F.log_softmax(t_logits / temp, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * temp
                * temp
            )
            hard_loss = F.cross_entropy(kd, t_logits.argmax(-1)) if hard else 0.0
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(cls, yb) + hard * hard_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(-1) == yv).float().mean().item()
        train_seconds += time.perf_counter() - t_epoch
        tune.report(
            {"val_acc": acc, "flops": flops, "epoch": epoch, "started": started, "ended": time.time() - t0,
             "teacher_images": teacher_images, "train_seconds": train_seconds}
        )  # fmt: skip


def run(trials: int, epochs: int, seed: int, out: Path, teacher: Path) -> pd.DataFrame:
    t0 = time.time()
    searcher = OptunaSearch(
        space=define,
        metric=["val_acc", "flops"],
        mode=["max", "min"],
        # picklable: Optuna 5.1's NSGA-II holds a lock that Ray cannot pickle (a fix any user needs)
        sampler=picklable(optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 3)), seed=seed)),
    )
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(train_one, teacher_path=str(teacher), epochs=epochs, t0=t0), {"cpu": 1}
        ),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials),
        run_config=tune.RunConfig(storage_path=str(out / "tune"), name=f"baseline-{seed}", verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        if "val_acc" in m:
            keys = ("val_acc", "flops", "started", "ended", "teacher_images", "train_seconds", "epoch")
            rows.append({k: m[k] for k in keys})
    df = pd.DataFrame(rows).sort_values("ended")
    df["wall_seconds"] = time.time() - t0
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--teacher", type=Path, default=ROOT / "teachers/digits_cnn.safetensors")
    args = ap.parse_args()
    if not args.teacher.is_file():
        raise SystemExit(
            f"{args.teacher}: train it first with `kdsearch teacher train search_spaces/digits_quick.yaml`"
        )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    out = args.out or Path(tempfile.mkdtemp(prefix="kdsearch-baseline-"))
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        df = run(args.trials, args.epochs, args.seed, out, args.teacher)
    finally:
        ray.shutdown()
    df.to_parquet(out / "baseline.parquet")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{len(df)} trials in {df.wall_seconds.iloc[0]:.1f} s; rows in {out / 'baseline.parquet'}")
    assert math.isfinite(df.val_acc.max()) and np.all(df.flops > 0)


if __name__ == "__main__":
    main()
