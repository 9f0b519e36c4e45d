"""Which Optuna sampler each search strategy should use, by measurement: the hypervolume each
sampler in kdsearch.space.samplers.SAMPLERS reaches at equal wall time, over several seeds.

    .venv/bin/python benchmarks/samplers.py [--mode standard|screen] [--spaces digits_quick digits_augment]
        [--seeds 3] [--samplers nsga2 tpe gp random] [--trials N] [--epochs N] [--json]
        [--autosampler-registry DIR]

`--mode standard` (kdsearch's standard strategy): one `run_search` per space, seed and sampler,
each with its own storage (each builds its own teacher-logit cache: none is favoured by a
warm one), interleaved seed-major (for each seed every sampler in turn) so the machine's load
falls on all samplers alike. Each trial's (val_acc, FLOPs) is taken at the time it ended,
counted from the run's start, and the hypervolume after each trial is computed as
benchmarks/search_vs_baseline.py computes it (`hypervolume_over_time`: normalized, one
reference point per space at val_acc 0 and the space's FLOPs budget). The time cut is the
same for every run of a space: the shortest run's time to its last trial. Printed per sampler:
the hypervolume at the cut (mean, std, min-max over seeds), the final one, the wall time and
the median time of one suggestion (the searcher's `suggest`, timed in the driver), with the
load average at the start and end of each search.

`--mode screen` (the one-shot strategy's screening sampler, `search.screen_sampler`): one small
supernet is trained once (kdsearch.train.supernet_training.train_supernet), then per seed and
sampler an ask/tell loop proposes `--subnets` students (student dimensions only, the budget as
Optuna constraints) in batches that `score_subnets` scores with inherited weights; the
hypervolume of (inherited val_acc, FLOPs) against the loop's wall time, cut as above.

AutoSampler (OptunaHub's `samplers/auto_sampler`) is not in optuna: `optunahub.load_module`
downloads it from GitHub at run time, and it imports cmaes. With `--autosampler-registry DIR`
(a local copy of the optunahub-registry repository; optunahub and cmaes importable) it is
loaded by `optunahub.load_local_module` and measured as `auto`; without, it is printed as not
measured, with the reason. What it would measure: for two or three objectives and a space with
a categorical dimension (every kdsearch space: pos_embed, patch_size...), AutoSampler delegates
to TPESampler(multivariate=True, constant_liar=True), kdsearch's `tpe`, below 250 completed
trials, and to NSGAIISampler from 250 on (its _sampler.py, optunahub-registry 2026-08-21).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_vs_baseline import hypervolume_over_time  # noqa: E402

from kdsearch.space.samplers import SAMPLERS  # noqa: E402


def load1() -> float:
    """The machine's 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def space_raw(name: str, trials: int | None, epochs: int | None) -> dict[str, Any]:
    """The shipped space `name` (or a space file's path) as plain data, its teacher's path
    absolute, trials/epochs overridden."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "search_spaces" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["teacher"]["checkpoint"] = str((path.parent / raw["teacher"]["checkpoint"]).resolve())
    if epochs:
        raw["train"]["epochs"] = epochs
    if trials:
        raw["search"]["trials"] = trials
    return raw


def autosampler(registry: Path | None) -> tuple[Callable[[Any, Any], Any] | None, str]:
    """AutoSampler's constructor (settings -> sampler) from a local registry copy, or None and why not."""
    if registry is None:
        return None, (
            "not measured: OptunaHub loads samplers/auto_sampler from GitHub at run time "
            "(optunahub.load_module), which this machine cannot reach (on kdsearch's spaces it runs "
            "TPE, as tpe here, below 250 trials and NSGA-II from 250); give --autosampler-registry DIR "
            "(a local copy of optunahub-registry) with optunahub and cmaes installed"
        )
    try:
        import optunahub

        module = optunahub.load_local_module("samplers/auto_sampler", registry_root=str(registry / "package"))
    except Exception as e:  # noqa: BLE001  (any failure here is the reason it is not measured)
        return None, f"not measured: {type(e).__name__}: {str(e).splitlines()[0]}"
    return (lambda settings, fixed=None: module.AutoSampler(seed=settings.seed)), "measured from a local registry copy"


class SuggestTimer:
    """Times KdsearchSearcher.suggest in this process (the driver): the calls that gave a config."""

    def __init__(self) -> None:
        from kdsearch.search.searcher import KdsearchSearcher

        self.cls, self.original, self.seconds = KdsearchSearcher, KdsearchSearcher.suggest, []

    def __enter__(self) -> SuggestTimer:
        original, seconds = self.original, self.seconds

        def suggest(searcher: Any, trial_id: str) -> Any:
            t0 = time.perf_counter()
            out = original(searcher, trial_id)
            if isinstance(out, dict):
                seconds.append(time.perf_counter() - t0)
            return out

        self.cls.suggest = suggest
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.suggest = self.original


def run_standard(raw: dict[str, Any], sampler: str, seed: int, out: Path) -> dict[str, Any]:
    """One standard search with `sampler` and `seed`: its trials' (ended s, val_acc, flops), wall, suggest times."""
    from kdsearch.search.run import run_search

    raw = {**raw, "search": {**raw["search"], "sampler": sampler, "seed": seed}}
    folder = out / f"{raw['name']}-{sampler}-{seed}"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(raw))
    load_start, t0 = load1(), time.time()
    with SuggestTimer() as timer:
        result = run_search(folder / "space.yaml", storage=folder / "runs", name="run", say=lambda s: None)
    wall = time.time() - t0
    trials = pd.DataFrame(result.trials)
    done = trials[trials.status.isin(["completed", "stopped_early"])]
    started = float(result.paths.meta()["started"])
    dims = sorted(c for c in trials.columns if c.split(".")[0] in ("student", "recipe", "train"))
    return {
        "configs": [tuple(map(str, row)) for row in trials[dims].itertuples(index=False)],
        "ended": done.finished_at.to_numpy(dtype=float) - started,
        "acc": done.val_acc.to_numpy(dtype=float),
        "flops": done.flops.to_numpy(dtype=float),
        "wall": wall,
        "trials": len(trials),
        "suggest_s": timer.seconds,
        "load": (load_start, load1()),
    }


def save_run(path: Path | None, space: str, sampler: str, seed: int, r: dict[str, Any]) -> None:
    """Append one run's raw figures to `path` as a JSON line (a cut-short benchmark keeps its runs)."""
    if path is not None:
        row = {"space": space, "sampler": sampler, "seed": seed, **{k: r[k] for k in ("wall", "trials", "load")}}
        row.update({k: [float(v) for v in r[k]] for k in ("ended", "acc", "flops", "suggest_s")})
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def hv_at(curve: pd.DataFrame, cut: float) -> float:
    """The hypervolume of the trials that ended by `cut` seconds (0 when none had)."""
    before = curve[curve.seconds <= cut + 1e-9]
    return float(before.hypervolume.iloc[-1]) if len(before) else 0.0


def shared_with_random(rows: list[dict[str, Any]], r: dict[str, Any]) -> float:
    """How many of run r's configs the random sampler's run of the same seed also tried (NaN without one)."""
    same = [o for o in rows if o["sampler"] == "random" and o["seed"] == r["seed"]]
    return float(len(set(r["configs"]) & set(same[0]["configs"]))) if same else float("nan")


def summarize(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Per run and per sampler: the hypervolume at the shared cut (the shortest run's last trial)."""
    cut = min(float(r["curve"].seconds.iloc[-1]) if len(r["curve"]) else 0.0 for r in rows)
    runs = pd.DataFrame(
        [
            {
                "sampler": r["sampler"],
                "seed": r["seed"],
                "trials": r["trials"],
                "wall s": r["wall"],
                "last trial s": float(r["curve"].seconds.iloc[-1]) if len(r["curve"]) else float("nan"),
                "HV at cut": hv_at(r["curve"], cut),
                "final HV": float(r["curve"].hypervolume.iloc[-1]) if len(r["curve"]) else 0.0,
                "suggest ms": 1e3 * statistics.median(r["suggest_s"]) if r["suggest_s"] else float("nan"),
                "as random": shared_with_random(rows, r),
                "load start": r["load"][0],
                "load end": r["load"][1],
            }
            for r in rows
        ]
    )
    g = runs.groupby("sampler", sort=False)
    table = pd.DataFrame(
        {
            "HV at cut mean": g["HV at cut"].mean(),
            "std": g["HV at cut"].std(ddof=1),
            "min": g["HV at cut"].min(),
            "max": g["HV at cut"].max(),
            "final HV mean": g["final HV"].mean(),
            "wall s mean": g["wall s"].mean(),
            "suggest ms median": g["suggest ms"].median(),
            "seeds": g["seed"].count(),
        }
    ).sort_values("HV at cut mean", ascending=False)
    return runs, table, cut


def print_space(space: str, rows: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """The per-run and per-sampler tables of one space; returns them as plain data."""
    runs, table, cut = summarize(rows)
    loads = runs[["load start", "load end"]].to_numpy()
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    print(f"\n== {space}: {what}; cut at {cut:.1f} s (the shortest run's last result)")
    print(
        f"load average (1 min) at each search's start and end: mean {loads.mean():.2f}, {loads.min():.2f}-{loads.max():.2f}"
    )
    print(runs.to_string(index=False, float_format=fmt))
    print()
    print(table.to_string(float_format=fmt))
    print(f"highest mean hypervolume at the cut: {table.index[0]}")
    return {
        "space": space,
        "cut_s": cut,
        "runs": runs.to_dict("records"),
        "table": table.reset_index().to_dict("records"),
    }


def standard_mode(args: argparse.Namespace, samplers: Sequence[str]) -> list[dict[str, Any]]:
    """Every space x seed x sampler as a standard search, seed-major; the tables of each space."""
    from kdsearch.space.file import parse_space
    from kdsearch.train.teacher import load_teacher

    out_all = []
    with tempfile.TemporaryDirectory() as tmp:
        for space in args.spaces:
            raw = space_raw(space, args.trials, args.epochs)
            # the built-in teacher, trained once if missing or stale (every run reads this file)
            load_teacher(parse_space(raw, base_dir=ROOT / "search_spaces"), train_if_missing=True, log=print)
            flops_ref = raw["budget"]["max_gflops"] * 1e9
            rows = []
            for seed in range(args.seeds):
                for sampler in samplers:
                    r = run_standard(raw, sampler, seed, Path(tmp))
                    save_run(args.save, space, sampler, seed, r)
                    r.update(
                        sampler=sampler,
                        seed=seed,
                        curve=hypervolume_over_time(r["ended"], r["acc"], r["flops"], flops_ref),
                    )
                    rows.append(r)
                    hv = r["curve"].hypervolume.iloc[-1] if len(r["curve"]) else 0.0
                    print(f"{space} seed {seed} {sampler}: {r['trials']} trials in {r['wall']:.1f} s, "
                          f"final HV {hv:.4f}, load {r['load'][0]:.2f}->{r['load'][1]:.2f}", flush=True)  # fmt: skip
            what = f"{raw['search']['trials']} trials x {raw['train']['epochs']} epochs, standard strategy"
            out_all.append(print_space(space, rows, what))
    return out_all


def train_screen_supernet(raw: dict[str, Any], epochs: int, tmp: Path) -> tuple[Any, Any, Any, float]:
    """The space, one supernet trained once for `epochs` with the teacher's cached logits, the data,
    and the training's seconds (kdsearch.train.supernet_training, as the one-shot strategy trains it)."""
    from kdsearch.space.file import parse_space
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import teacher_logits
    from kdsearch.train.setup import TrialSetup
    from kdsearch.train.supernet_training import train_supernet
    from kdsearch.train.teacher import load_teacher

    space = parse_space(raw, base_dir=ROOT / "search_spaces")
    data = load_data(space)
    teacher = load_teacher(space, train_if_missing=True, log=print, data=data)
    logits, _ = teacher_logits(teacher, data, space.teacher, tmp / "cache")
    setup = TrialSetup(workdir=tmp / "supernet", data=data, teacher=teacher, cached_logits=logits)
    t0 = time.time()
    supernet = train_supernet(space, setup, epochs, report=lambda r: print(f"supernet {r}", flush=True))
    return space, supernet, data, time.time() - t0


def ask_batch(space: Any, study: Any, known: dict, size: int, asks: list[float]) -> dict[Any, list[Any]]:
    """Up to `size` new feasible students, asked of `study` (student dimensions only); students
    seen before are told their values, new infeasible ones their worst accuracy (as the
    screening does: kdsearch.search.screening). Ends early after 2,000 asks that add nothing."""
    import dataclasses

    from kdsearch.space import objectives as objective_table
    from kdsearch.space.objectives import values_for_sampler

    students = dataclasses.replace(space, dims=space.student_dims())
    new: dict[Any, list[Any]] = {}
    stall = 0
    while len(new) < size and stall < 2000:
        t0 = time.perf_counter()
        trial = study.ask()
        student = students.suggest(trial).student
        asks.append(time.perf_counter() - t0)
        stall += 1
        if student in known:
            study.tell(trial, known[student])
        elif student in new:
            new[student].append(trial)
        elif not space.budget.feasible(student):
            costs = {n: objective_table.get(n).compute(student) for n, _ in space.objectives if n != "val_acc"}
            known[student] = values_for_sampler(costs, space.objectives)
            study.tell(trial, known[student])
        else:
            new[student], stall = [trial], 0
    return new


def run_screen(
    space: Any, supernet: Any, data: Any, sampler: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One screening loop with `sampler` and `seed`: `args.subnets` distinct feasible students
    scored by `score_subnets` in batches of `args.batch`, each scored one's time and values."""
    import dataclasses

    import optuna

    from kdsearch.space import objectives as objective_table
    from kdsearch.space.objectives import values_for_sampler
    from kdsearch.space.samplers import make_sampler
    from kdsearch.train.supernet_training import score_subnets

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = dataclasses.replace(space.search, sampler=sampler, seed=seed, trials=args.subnets, population_size=None)
    directions = ["maximize" if mode == "max" else "minimize" for _, mode in space.objectives]
    study = optuna.create_study(directions=directions, sampler=make_sampler(settings))
    known: dict[Any, list[float]] = {}
    ended, acc, flops, asks = [], [], [], []
    load_start, t0 = load1(), time.time()
    while len(acc) < args.subnets:
        new = ask_batch(space, study, known, min(args.batch, args.subnets - len(acc)), asks)
        if not new:
            break  # the sampler proposes nothing new: the space is spent
        scores = score_subnets(supernet, list(new), data)
        for (student, trials), score in zip(new.items(), scores, strict=True):
            costs = {n: objective_table.get(n).compute(student) for n, _ in space.objectives if n != "val_acc"}
            known[student] = values_for_sampler({**costs, "val_acc": score}, space.objectives)
            for trial in trials:
                study.tell(trial, known[student])
            ended.append(time.time() - t0)
            acc.append(float(score))
            flops.append(float(objective_table.get("flops").compute(student)))
    wall = time.time() - t0
    return {
        "ended": np.array(ended), "acc": np.array(acc), "flops": np.array(flops), "wall": wall, "trials": len(acc),
        "suggest_s": asks, "load": (load_start, load1()), "configs": [repr(s) for s in known],
    }  # fmt: skip


def screen_mode(args: argparse.Namespace, samplers: Sequence[str]) -> list[dict[str, Any]]:
    """One supernet per space, trained once; then every seed x sampler screening loop, seed-major."""
    out_all = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.spaces:
            raw = space_raw(name, None, None)
            space, supernet, data, train_s = train_screen_supernet(raw, args.epochs or 5, Path(tmp) / raw["name"])
            print(f"{name}: supernet trained in {train_s:.1f} s ({args.epochs or 5} epochs)", flush=True)
            flops_ref = raw["budget"]["max_gflops"] * 1e9
            rows = []
            for seed in range(args.seeds):
                for sampler in samplers:
                    r = run_screen(space, supernet, data, sampler, seed, args)
                    r.update(
                        sampler=sampler,
                        seed=seed,
                        curve=hypervolume_over_time(r["ended"], r["acc"], r["flops"], flops_ref),
                    )
                    rows.append(r)
                    print(
                        f"{name} seed {seed} {sampler}: {r['trials']} subnets scored in {r['wall']:.1f} s", flush=True
                    )
            what = f"screening {args.subnets} subnets (batches of {args.batch}) with one supernet of {args.epochs or 5} epochs"
            out_all.append(print_space(name, rows, what))
    return out_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["standard", "screen"], default="standard")
    ap.add_argument("--spaces", nargs="+", default=["digits_quick"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samplers", nargs="+", default=None, help="default: every SAMPLERS name (and auto when loadable)")
    ap.add_argument("--trials", type=int, default=None, help="standard: the space's search.trials by default")
    ap.add_argument("--epochs", type=int, default=None, help="standard: trial epochs; screen: supernet epochs")
    ap.add_argument("--subnets", type=int, default=200, help="screen: subnets scored per sampler and seed")
    ap.add_argument("--batch", type=int, default=25, help="screen: subnets asked, scored and told at a time")
    ap.add_argument("--autosampler-registry", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="standard: append each run's raw figures as a JSON line")
    ap.add_argument("--json", action="store_true", help="also print every table as one JSON line at the end")
    args = ap.parse_args()
    make_auto, why = autosampler(args.autosampler_registry)
    if make_auto is not None:
        SAMPLERS["auto"] = make_auto  # this process only: the space accepts a SAMPLERS name
    samplers = args.samplers or list(SAMPLERS)
    print(f"samplers: {', '.join(samplers)}; AutoSampler: {why}", flush=True)
    if args.mode == "standard":
        tables = standard_mode(args, samplers)
    else:
        tables = screen_mode(args, samplers)
    if args.json:
        print(json.dumps({"mode": args.mode, "autosampler": why, "spaces": tables}, default=_plain))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
