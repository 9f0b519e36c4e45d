"""One-shot screening against today's search: the wall time to the same hypervolume.

    .venv/bin/python benchmarks/oneshot.py [--spaces digits_quick,digits_8px] [--seeds 3]
        [--budgets 96,24] [--oneshot-trials 16,8] [--csv FILE] [--screen-subnets N] [--standard-from CSV]

For each space, seed and budget B: today's strategy (`search.strategy: standard`) runs B trials
with the space's epochs and early stopping; its final hypervolume is the target. The one-shot
strategy (supernet, screening, then the kept students trained as ordinary trials) runs with
the matching `--oneshot-trials`, and the time it takes to reach the target is read from its
hypervolume over time, counted from the run's start, so the supernet and the screening are
inside it. Both runs are one after the other on this machine, with the same seed, teacher,
split and reference point (val_acc 0, the space's FLOPs budget).

`--standard-from CSV` reads today's figures from an earlier run of this script (same machine,
same seeds), so one-shot settings (`--screen-subnets`, `--oneshot-trials`) can be compared
against one standard search without running it again.

Goal (issue 22): at 96 trials, the one-shot strategy reaches the target in at most one fifth
of today's wall time on every seed. Printed beside it: Kendall's tau between the inherited and
the trained accuracy of the students it trained, and the supernet's share of its run.

Spaces: `digits_quick` (16 px) as shipped, and `digits_8px`: the same space at digits' own
8 px (patch sizes 2 and 4 give 16 or 4 tokens), with the FLOPs budget scaled by the pixels.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_vs_baseline import hypervolume_over_time, time_to_reach  # noqa: E402

GOAL = 1 / 5  # the one-shot strategy's time to the target, as a share of today's wall time


def digits_quick(raw: dict) -> dict:
    return raw


def digits_8px(raw: dict) -> dict:
    raw = {**raw, "data": {**raw["data"], "img_size": 8}}
    raw["budget"] = {**raw["budget"], "max_gflops": raw["budget"]["max_gflops"] * (8 / 16) ** 2}
    # a teacher of its own: a checkpoint records the images it was trained on (trained when missing)
    raw["teacher"] = {**raw["teacher"], "checkpoint": str(ROOT / "teachers/digits_cnn_8px.safetensors")}
    return raw


SPACES: dict[str, Callable[[dict], dict]] = {"digits_quick": digits_quick, "digits_8px": digits_8px}


def run_strategy(raw: dict, strategy: str, trials: int, seed: int, out: Path, **search: Any) -> dict:
    """One search of `raw` with `strategy` (and `search` settings); its hypervolume over time and what the run says."""
    from kdsearch.results.oneshot import load_oneshot
    from kdsearch.search.run import run_search

    raw = {**raw, "search": {**raw["search"], "seed": seed, "trials": trials, "strategy": strategy, **search}}
    name = f"{raw['name']}-{strategy}-{trials}-{seed}-{len(list(out.glob('*.yaml')))}"
    space = out / f"{name}.yaml"
    space.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    result = run_search(space, storage=out / "runs", name=name, say=lambda s: None)
    wall = time.time() - t0
    trials_df = pd.DataFrame(result.trials)
    done = trials_df[trials_df.status.isin(["completed", "stopped_early"])]
    started = float(result.paths.meta()["started"])
    flops_ref = raw["budget"]["max_gflops"] * 1e9
    curve = hypervolume_over_time(
        done.finished_at.to_numpy() - started, done.val_acc.to_numpy(float), done.flops.to_numpy(float), flops_ref
    )
    row = {"wall": wall, "curve": curve, "trials": len(trials_df), "tau": np.nan, "tau_n": 0, "supernet_share": np.nan}
    oneshot = load_oneshot(result.paths)
    if oneshot is not None:
        row.update(tau=oneshot.kendall_tau, tau_n=oneshot.tau_n, supernet_share=oneshot.supernet_share)
    return row


def compare(
    raw: dict, seed: int, budget: int, oneshot_trials: int, out: Path, known: dict | None, **search: Any
) -> dict:
    """Today's strategy at `budget` trials (or its figures from an earlier run's CSV row,
    `known`), then the one-shot one; the figures of one seed."""
    if known is None:
        standard = run_strategy(raw, "standard", budget, seed, out)
        target = float(standard["curve"].hypervolume.iloc[-1]) if len(standard["curve"]) else 0.0
        known = {"standard wall s": standard["wall"], "target HV": target,
                 "standard reaches it at s": time_to_reach(standard["curve"], target)}  # fmt: skip
    oneshot = run_strategy(raw, "oneshot", oneshot_trials, seed, out, **search)
    target = float(known["target HV"])
    reach = time_to_reach(oneshot["curve"], target)
    return {
        "space": raw["name"],
        "seed": seed,
        "budget": budget,
        "standard wall s": float(known["standard wall s"]),
        "target HV": target,
        "standard reaches it at s": float(known["standard reaches it at s"]),
        "oneshot trials": oneshot_trials,
        "screen subnets": search.get("screen_subnets", raw["search"].get("screen_subnets", 1000)),
        "oneshot wall s": oneshot["wall"],
        "oneshot final HV": float(oneshot["curve"].hypervolume.iloc[-1]) if len(oneshot["curve"]) else 0.0,
        "oneshot reaches it at s": reach,
        "share of standard wall": reach / float(known["standard wall s"]),
        "kendall tau": oneshot["tau"],
        "tau n": oneshot["tau_n"],
        "supernet share": oneshot["supernet_share"],
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", default=",".join(SPACES), help="comma-separated: " + ", ".join(SPACES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budgets", default="96,24", help="today's trials per search")
    ap.add_argument("--oneshot-trials", default="16,8", help="the one-shot runs' trained students, per budget")
    ap.add_argument("--csv", type=Path, default=None, help="append each seed's row to this CSV as it finishes")
    ap.add_argument("--screen-subnets", type=int, default=None, help="the one-shot runs' search.screen_subnets")
    ap.add_argument("--standard-from", type=Path, default=None,
                    help="a CSV this script wrote: today's figures per space, seed and budget are read, not rerun")  # fmt: skip
    args = ap.parse_args()
    search = {} if args.screen_subnets is None else {"screen_subnets": args.screen_subnets}
    earlier = {}
    if args.standard_from is not None:
        for row in csv.DictReader(args.standard_from.open()):
            earlier[row["space"], int(row["seed"]), int(row["budget"])] = row
    budgets = [int(b) for b in args.budgets.split(",")]
    oneshot_trials = [int(b) for b in args.oneshot_trials.split(",")]
    if len(budgets) != len(oneshot_trials):
        ap.error("--budgets and --oneshot-trials need one value each")
    base = yaml.safe_load((ROOT / "search_spaces/digits_quick.yaml").read_text())
    base["teacher"]["checkpoint"] = str(ROOT / "teachers/digits_cnn.safetensors")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for space_name in args.spaces.split(","):
            raw = {**SPACES[space_name](base), "name": space_name}
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for budget, n in zip(budgets, oneshot_trials, strict=True):
                    known = earlier.get((space_name, seed, budget))
                    row = compare(raw, seed, budget, n, Path(tmp), known, **search)
                    rows.append(row)
                    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                    if args.csv is not None:
                        new = not args.csv.exists()
                        with args.csv.open("a", newline="") as f:
                            writer = csv.DictWriter(f, fieldnames=list(row))
                            if new:
                                writer.writeheader()
                            writer.writerow(row)
    df = pd.DataFrame(rows)
    print()
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for (space, budget), g in df.groupby(["space", "budget"]):
        met = (g["share of standard wall"] <= GOAL).all()
        print(
            f"{space} at {budget} trials: one-shot reaches today's hypervolume in "
            f"{g['share of standard wall'].median():.0%} of its wall time (median of {len(g)} seeds; "
            f"worst {g['share of standard wall'].max():.0%}); goal <= {GOAL:.0%} on every seed: {'met' if met else 'not met'}"
        )


if __name__ == "__main__":
    main()
