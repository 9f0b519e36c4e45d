"""kdsearch against the search a user would write by hand (benchmarks/baseline.py) on the same
space: hypervolume against wall time, over several seeds each, with one shared reference point.

    .venv/bin/python benchmarks/search_vs_baseline.py [--seeds 3] [--trials 12] [--epochs 30]

Both search `search_spaces/digits_quick.yaml`'s students with the same teacher checkpoint, the
same train/val split, the same trial count and epochs, one CPU per trial on this machine's
cores, and NSGA-II with the same seed. The hypervolume of (val_acc max, FLOPs min) is computed
for both the same way (kdsearch.results.pareto.normalized_hypervolume) against the one
reference point (val_acc 0, FLOPs at the space's budget): a config over the budget adds
nothing, whichever search trained it.

Goal (issue 12): kdsearch reaches the baseline's final hypervolume in at most half its wall
time. Also printed: the teacher images each search ran per trial and the share of the workers'
time spent in training epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kdsearch.space.file import parse_space
from kdsearch.train.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SLOTS = os.cpu_count() or 1


def hypervolume_over_time(ended: np.ndarray, acc: np.ndarray, flops: np.ndarray, flops_ref: float) -> pd.DataFrame:
    """The normalized hypervolume after each trial, in the order the trials ended."""
    from kdsearch.results.pareto import hypervolume_history

    order = np.argsort(ended)
    pts = np.column_stack([acc[order], flops[order]])
    hv = hypervolume_history(pts, [True, False], [0.0, flops_ref], [1.0, 0.0]) if len(pts) else []
    return pd.DataFrame({"seconds": ended[order], "hypervolume": hv})


def time_to_reach(curve: pd.DataFrame, target: float) -> float:
    hit = curve[curve.hypervolume >= target - 1e-12]
    return float(hit.seconds.iloc[0]) if len(hit) else float("inf")


def run_kdsearch(space_raw: dict, seed: int, out: Path) -> dict:
    from kdsearch.search.run import run_search

    raw = {**space_raw, "search": {**space_raw["search"], "seed": seed}}
    space = out / f"space-{seed}.yaml"
    space.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    result = run_search(space, storage=out / "runs", name=f"kdsearch-{seed}", say=lambda s: None)
    wall = time.time() - t0
    trials = pd.DataFrame(result.trials)
    epochs = pd.DataFrame(result.paths.rows("epochs.parquet"))
    done = trials[trials.status.isin(["completed", "stopped_early"])]
    started = float(result.paths.meta()["started"])
    return {
        "ended": done.finished_at.to_numpy() - started,
        "acc": done.val_acc.to_numpy(dtype=float),
        "flops": done.flops.to_numpy(dtype=float),
        "wall": wall,
        "teacher_images_per_trial": epochs.groupby("trial_id").teacher_images.max().sum() / max(len(trials), 1),
        "training_share": epochs.epoch_seconds.sum() / (wall * SLOTS),
        "trials": len(trials),
    }


def run_baseline(seed: int, trials: int, epochs: int, out: Path, teacher: Path) -> dict:
    import logging

    import ray
    from baseline import run

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        df = run(trials, epochs, seed, out, teacher)
    finally:
        ray.shutdown()
    return {
        "ended": df.ended.to_numpy(),
        "acc": df.val_acc.to_numpy(dtype=float),
        "flops": df.flops.to_numpy(dtype=float),
        "wall": float(df.wall_seconds.iloc[0]),
        "teacher_images_per_trial": float(df.teacher_images.mean()),
        "training_share": float(df.train_seconds.sum()) / (float(df.wall_seconds.iloc[0]) * SLOTS),
        "trials": len(df),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    raw = yaml.safe_load((ROOT / "search_spaces/digits_quick.yaml").read_text())
    teacher = ROOT / "teachers/digits_cnn.safetensors"
    raw["teacher"]["checkpoint"] = str(teacher)
    raw["train"]["epochs"] = args.epochs or raw["train"]["epochs"]
    raw["search"]["trials"] = args.trials or raw["search"]["trials"]
    flops_ref = raw["budget"]["max_gflops"] * 1e9
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # the built-in teacher, trained once if missing or stale (both searches use this file)
        load_teacher(parse_space(raw, base_dir=ROOT / "search_spaces"), train_if_missing=True, log=print)
        for seed in range(args.seeds):
            for name in ("baseline", "kdsearch"):
                if name == "kdsearch":
                    r = run_kdsearch(raw, seed, out)
                else:
                    r = run_baseline(seed, raw["search"]["trials"], raw["train"]["epochs"], out, teacher)
                curve = hypervolume_over_time(r["ended"], r["acc"], r["flops"], flops_ref)
                rows.append(
                    {
                        "search": name,
                        "seed": seed,
                        "trials": r["trials"],
                        "wall s": r["wall"],
                        "final hypervolume": float(curve.hypervolume.iloc[-1]) if len(curve) else 0.0,
                        "teacher images / trial": r["teacher_images_per_trial"],
                        "training share": r["training_share"],
                        "curve": curve,
                    }
                )
                print(f"{name} seed {seed}: {r['trials']} trials in {r['wall']:.1f} s", flush=True)
    df = pd.DataFrame(rows)
    reach = []
    for seed in range(args.seeds):
        base = df[(df.search == "baseline") & (df.seed == seed)].iloc[0]
        kd = df[(df.search == "kdsearch") & (df.seed == seed)].iloc[0]
        t = time_to_reach(kd.curve, base["final hypervolume"])
        reach.append({"seed": seed, "baseline final HV": base["final hypervolume"], "baseline wall s": base["wall s"],
                      "kdsearch reaches it at s": t, "fraction of baseline time": t / base["wall s"]})  # fmt: skip
    print(f"\n{raw['search']['trials']} trials x {raw['train']['epochs']} epochs per search, {SLOTS} CPU slots, "
          f"reference point (val_acc 0, {flops_ref:.3g} FLOPs)")  # fmt: skip
    print(df.drop(columns="curve").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print()
    print(pd.DataFrame(reach).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    frac = np.median([r["fraction of baseline time"] for r in reach])
    print(
        f"\nmedian over seeds: kdsearch reaches the baseline's final hypervolume in {frac:.0%} of the baseline's wall time (goal <= 50%)"
    )


if __name__ == "__main__":
    main()
