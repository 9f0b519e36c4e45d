"""The search driver's cost per trial as a run grows: kdsearch's search loop against plain Ray
Tune + OptunaSearch, both around trials that train nothing.

    .venv/bin/python benchmarks/driver_scale.py [--trials 300] [--epochs 3] [--sampler nsga2] [--json]

Each trial reports `--epochs` epochs at once (`kdsearch.search.trainable.noop_trial`: the student's
exact costs, a made-up accuracy), so all that is measured is the driver: Ray Tune's loop, the
searcher, and for kdsearch its scheduler, recorder (trials and epochs tables), study mirror
and searcher reconciliation. kdsearch runs through `run_search(..., trial=noop_trial)` (the
documented hook), plain Tune through `tune.Tuner` with Ray's OptunaSearch over the same
define-by-run space and the same sampler, the same concurrency and actor reuse, in the same
Ray instance, one after the other. Figures:

- ms per trial over the first and the last 10% of trials (by finish time: when Tune calls the
  callbacks' on_trial_complete), and their ratio (flat: about 1);
- "hooks": ms per trial the driver spent in the searcher's methods (suggest, on_trial_result,
  on_trial_complete: Optuna's ask and tell for both), in Ray Tune's experiment snapshots
  (TuneController.save_to_dir) and, for kdsearch, in its recorder and scheduler, over the
  same spans: kdsearch's own cost, less sensitive to a busy machine than
  the spans themselves (Tune's loop is the same for both);
- the searcher's `suggest` (median and 99th percentile, ms), timed in this process;
- the driver's peak RSS (psutil, sampled every 0.2 s; the workers are not counted);
- the time to read the final tables (kdsearch: `RunPaths.rows` of trials and epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def space_file(tmp: Path, trials: int, epochs: int, sampler: str) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces/digits_quick.yaml").read_text())
    raw["teacher"]["checkpoint"] = str(ROOT / "teachers/digits_cnn.safetensors")  # never loaded: no training
    raw["train"]["epochs"] = epochs
    raw["search"].update(trials=trials, sampler=sampler, checkpoint_every=0)
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Rss:
    """The driver's resident memory, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.samples.append(me.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> Rss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max(self.samples) / 2**20


class Timed:
    """Times methods of classes (a searcher's, a callback's) in this process: when each call
    started and how long it took. Measuring only: each method runs as it is."""

    def __init__(self, *methods: tuple[type, str]):
        self.methods = [(cls, name, getattr(cls, name)) for cls, name in methods]
        self.calls: dict[str, list[tuple[float, float]]] = {f"{c.__name__}.{n}": [] for c, n in methods}

    def __enter__(self) -> Timed:
        for cls, name, original in self.methods:
            setattr(cls, name, self._timed(original, self.calls[f"{cls.__name__}.{name}"]))
        return self

    @staticmethod
    def _timed(original: Any, calls: list[tuple[float, float]]) -> Any:
        def timed(obj: Any, *a: Any, **k: Any) -> Any:
            start, t0 = time.time(), time.perf_counter()
            try:
                return original(obj, *a, **k)
            finally:
                calls.append((start, time.perf_counter() - t0))

        return timed

    def __exit__(self, *exc: Any) -> None:
        for cls, name, original in self.methods:
            setattr(cls, name, original)

    def seconds(self, name: str) -> list[float]:
        return [d for _, d in self.calls[name]]

    def starts(self, name: str) -> list[float]:
        return [t for t, _ in self.calls[name]]

    def within(self, lo: float, hi: float) -> float:
        """Seconds spent in every timed method by calls that started in [lo, hi]."""
        return sum(d for calls in self.calls.values() for t, d in calls if lo <= t <= hi)


def rates(finished: list[float], hooks: Timed) -> dict[str, float]:
    """ms per trial over the first and the last 10% of trials by finish time, and the ms per
    trial the driver spent in the searcher's and callbacks' methods (`hooks`) in those spans."""
    t = sorted(finished)
    k = max(2, len(t) // 10)
    first, last, every = (t[k - 1] - t[0]) / (k - 1), (t[-1] - t[-k]) / (k - 1), (t[-1] - t[0]) / (len(t) - 1)
    hook_first, hook_last = hooks.within(t[0], t[k - 1]) / (k - 1), hooks.within(t[-k], t[-1]) / (k - 1)
    return {
        "ms/trial, all": 1e3 * every,
        "first 10% ms/trial": 1e3 * first,
        "last 10% ms/trial": 1e3 * last,
        "last / first": last / first,
        "hooks first 10% ms/trial": 1e3 * hook_first,
        "hooks last 10% ms/trial": 1e3 * hook_last,
    }


def summary(
    name: str, wall: float, finished: list[float], suggest: list[float], hooks: Timed, rss: Rss, read_s: float
) -> dict:
    s = sorted(suggest) or [0.0]
    return {
        "driver": name,
        "trials": len(finished),
        "wall s": wall,
        **rates(finished, hooks),
        "suggest median ms": 1e3 * statistics.median(s),
        "suggest p99 ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
        "peak RSS MiB": rss.peak_mib,
        "read tables s": read_s,
    }


def run_kdsearch(space: Path, storage: Path) -> dict:
    from ray.tune.execution.tune_controller import TuneController

    from kdsearch.results.tables import RunPaths
    from kdsearch.search.callbacks import ResultsRecorder
    from kdsearch.search.run import run_search
    from kdsearch.search.scheduler import ParetoHalving
    from kdsearch.search.searcher import KdsearchSearcher
    from kdsearch.search.trainable import noop_trial

    methods = [(KdsearchSearcher, m) for m in ("suggest", "on_trial_result", "on_trial_complete")]
    methods += [(ResultsRecorder, m) for m in ("on_trial_result", "on_trial_complete", "on_trial_error")]
    methods += [(ParetoHalving, "on_trial_result")]
    methods += [(TuneController, "save_to_dir")]  # Ray Tune's experiment snapshot (same in both)
    with Rss() as rss, Timed(*methods) as hooks:
        t0 = time.perf_counter()
        result = run_search(space, storage=storage, name="kdsearch", say=lambda s: None, trial=noop_trial)
        wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    trials = result.paths.rows(RunPaths.TRIALS)
    epochs = result.paths.rows(RunPaths.EPOCHS)
    read_s = time.perf_counter() - t0
    finished = hooks.starts("ResultsRecorder.on_trial_complete")
    out = summary("kdsearch", wall, finished, hooks.seconds("KdsearchSearcher.suggest"), hooks, rss, read_s)
    out["trial rows"], out["epoch rows"] = len(trials), len(epochs)
    out["hooks by method"] = {k: (len(v), 1e3 * sum(d for _, d in v)) for k, v in hooks.calls.items()}
    return out


def run_plain_tune(space_path: Path, storage: Path) -> dict:
    import pandas as pd
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.optuna import OptunaSearch

    from kdsearch.search.searcher import DefineByRun
    from kdsearch.search.trainable import noop_trial
    from kdsearch.space.file import load_space
    from kdsearch.space.samplers import make_sampler
    from kdsearch.space.specs import TrialSpec

    space = load_space(space_path)

    def trainable(config: dict[str, Any]) -> None:
        meta = config["kdsearch"]
        spec = TrialSpec.from_dict(meta["spec"])
        if meta["infeasible"]:
            from kdsearch.space import objectives as objective_table

            tune.report({"epoch": 0, "val_acc": 0.0, **objective_table.computed(spec.student)})
            return
        noop_trial(spec, tune.report)

    class Finished(tune.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.times.append(time.time())

    searcher = OptunaSearch(
        space=DefineByRun(space),
        metric=[n for n, _ in space.objectives],
        mode=[m for _, m in space.objectives],
        sampler=make_sampler(dataclasses.replace(space.search)),
    )
    finished = Finished()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": space.resources.cpus}),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=space.search.trials,
            max_concurrent_trials=space.search.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="plain", storage_path=str(storage), callbacks=[finished], verbose=0),
    )
    with (
        Rss() as rss,
        Timed(
            *[(OptunaSearch, m) for m in ("suggest", "on_trial_result", "on_trial_complete")],
            (TuneController, "save_to_dir"),
        ) as hooks,
    ):
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    frame = grid.get_dataframe()  # what plain Tune offers to read back: every trial's last result
    read_s = time.perf_counter() - t0
    assert isinstance(frame, pd.DataFrame)
    out = summary("plain Tune", wall, finished.times, hooks.seconds("OptunaSearch.suggest"), hooks, rss, read_s)
    out["hooks by method"] = {k: (len(v), 1e3 * sum(d for _, d in v)) for k, v in hooks.calls.items()}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sampler", default="nsga2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from kdsearch.search.ray_session import init_ray

    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        space = space_file(Path(tmp), args.trials, args.epochs, args.sampler)
        rows = [run_plain_tune(space, Path(tmp) / "plain"), run_kdsearch(space, Path(tmp) / "runs")]
    if args.json:
        print(json.dumps(rows))
        return rows
    print(f"{args.trials:,} no-op trials of {args.epochs} epochs, sampler {args.sampler}, {os.cpu_count()} CPUs")
    keys = [k for k in rows[1] if k not in ("driver", "hooks by method")]
    print(f"{'':22}" + "".join(f"{r['driver']:>14}" for r in rows))
    for k in keys:
        print(f"{k:22}" + "".join(_fmt(r.get(k)) for r in rows))
    plain, kd = rows
    for row in rows:
        calls = ", ".join(f"{k} {n} {ms:,.0f}" for k, (n, ms) in row["hooks by method"].items())
        print(f"{row['driver']}, timed methods (calls, ms in all): {calls}")
    for span in ("all", "first", "last"):
        key = "ms/trial, all" if span == "all" else f"{span} 10% ms/trial"
        print(f"kdsearch / plain Tune, ms/trial ({key}): {kd[key] / plain[key]:.2f} (goal <= 1.10)")
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return f"{'-':>14}"
    return f"{v:>14,.2f}" if isinstance(v, float) else f"{v:>14,}"


if __name__ == "__main__":
    main()
