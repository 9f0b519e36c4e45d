"""How long Optuna takes to ask for a config and be told its result, with 1,000 and 10,000
completed trials in the study, for the samplers kdsearch makes (kdsearch.space.samplers).

    .venv/bin/python benchmarks/sampler_scale.py [--sizes 1000 10000] [--asks 20]

The study is kdsearch's own: search_spaces/digits_quick.yaml's define-by-run space with its
FLOPs budget as a constraint, two objectives (val_acc max, flops min); the completed trials
are added with made-up values (accuracy random, FLOPs from the spec), then `--asks` trials are
asked and told one at a time, as the searcher does, and the median ask+tell is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import optuna

from kdsearch.search.searcher import DefineByRun
from kdsearch.space import objectives as objective_table
from kdsearch.space.file import load_space
from kdsearch.space.objectives import values_for_sampler
from kdsearch.space.samplers import make_sampler
from kdsearch.space.specs import TrialSpec

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.ERROR)


def one(space, define, study, rng) -> float:
    t0 = time.perf_counter()
    trial = study.ask()
    config = define(trial)["kdsearch"]
    spec = TrialSpec.from_dict(config["spec"])
    result = {**objective_table.computed(spec.student), "val_acc": float(rng.random())}
    study.tell(trial, values_for_sampler(result, space.objectives))
    return time.perf_counter() - t0


def measure(sampler: str, size: int, asks: int) -> dict:
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    settings = dataclasses.replace(space.search, sampler=sampler, trials=size + asks)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(settings))
    define, rng = DefineByRun(space), np.random.default_rng(0)
    filler = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    t0 = time.perf_counter()
    for _ in range(size):  # the history, told to a random sampler and copied over (fast)
        one(space, define, filler, rng)
    study.add_trials(filler.get_trials(deepcopy=False))
    fill = time.perf_counter() - t0
    times = [one(space, define, study, rng) for _ in range(asks)]
    return {"sampler": sampler, "completed": size, "median ms": 1e3 * statistics.median(times),
            "max ms": 1e3 * max(times), "fill s": fill}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--asks", type=int, default=20)
    ap.add_argument("--samplers", nargs="+", default=["nsga2", "tpe"])
    args = ap.parse_args()
    print(f"{'sampler':8} {'completed':>9} {'ask+tell median ms':>19} {'max ms':>8}")
    for sampler in args.samplers:
        for size in args.sizes:
            r = measure(sampler, size, args.asks)
            print(f"{r['sampler']:8} {r['completed']:>9,} {r['median ms']:>19.1f} {r['max ms']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
