"""How long Optuna takes to ask for a config and be told its result, with 1,000 and 10,000
completed trials in the study, for the samplers kdsearch makes (kdsearch.space.samplers).

    .venv/bin/python benchmarks/sampler_scale.py [--sizes 1000 10000] [--asks 20] [--samplers nsga2 tpe ...]

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


# TPE with one setting changed from kdsearch's (to see what its cost depends on)
VARIANTS = {
    "tpe-ei8": {"n_ei_candidates": 8},
    "tpe-no-liar": {"constant_liar": False},
    "tpe-univariate": {"multivariate": False},
}


def sampler_of(name: str, settings) -> optuna.samplers.BaseSampler:
    if name in VARIANTS:
        base = make_sampler(dataclasses.replace(settings, sampler="tpe"))
        kwargs = {"seed": settings.seed, "multivariate": base._multivariate, "constant_liar": base._constant_liar}
        kwargs["n_ei_candidates"] = base._n_ei_candidates
        return optuna.samplers.TPESampler(**{**kwargs, **VARIANTS[name]})
    return make_sampler(dataclasses.replace(settings, sampler=name))


def history(size: int) -> list:
    """`size` completed trials of kdsearch's space, told to a random sampler (fast)."""
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    filler = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    define, rng = DefineByRun(space), np.random.default_rng(0)
    for _ in range(size):
        one(space, define, filler, rng)
    return filler.get_trials(deepcopy=False)


def measure(sampler: str, trials: list, asks: int) -> dict:
    space = load_space(ROOT / "search_spaces/digits_quick.yaml")
    settings = dataclasses.replace(space.search, trials=len(trials) + asks)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler_of(sampler, settings))
    study.add_trials(trials)
    define, rng = DefineByRun(space), np.random.default_rng(0)
    one(space, define, study, rng)  # the first ask also reads the copied history into the sampler's caches
    times = [one(space, define, study, rng) for _ in range(asks)]
    return {"sampler": sampler, "completed": len(trials), "median ms": 1e3 * statistics.median(times),
            "max ms": 1e3 * max(times)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--asks", type=int, default=20)
    ap.add_argument("--samplers", nargs="+", default=["nsga2", "tpe", *VARIANTS])
    args = ap.parse_args()
    print(f"{'sampler':8} {'completed':>9} {'ask+tell median ms':>19} {'max ms':>8}")
    for size in args.sizes:
        trials = history(size)
        for sampler in args.samplers:
            r = measure(sampler, trials, args.asks)
            print(f"{r['sampler']:8} {r['completed']:>9,} {r['median ms']:>19.1f} {r['max ms']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
