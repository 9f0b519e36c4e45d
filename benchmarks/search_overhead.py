"""How much of the workers' time a search spends training: kdsearch's settings (actor reuse,
data loaded once per worker) against Ray's default of a fresh worker per trial.

    .venv/bin/python benchmarks/search_overhead.py [--trials N] [--epochs N]

Defaults: the embedded default's own trials and epochs (search_spaces/digits_quick.yaml), with
early stopping off and a random sampler so both runs train the same configs.

Goal (issue 4): at least 90% of worker time in train/eval steps on the embedded default.
"busy" is the sum of every epoch's train+eval seconds as the trials measured them; "span" runs
from the first trial's start to the last trial's end; the two CPU slots make the worker time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from kdsearch.search.run import run_search

ROOT = Path(__file__).resolve().parents[1]


def bench(space_file: Path, storage: Path, reuse: bool, slots: int) -> dict:
    t0 = time.perf_counter()
    result = run_search(space_file, storage=storage, name=f"reuse-{reuse}", say=lambda s: None, reuse_actors=reuse)
    wall = time.perf_counter() - t0
    epochs = pd.read_parquet(result.paths.store.local_path() / "epochs.parquet")
    trials = pd.read_parquet(result.paths.store.local_path() / "trials.parquet")
    starts = epochs[epochs.epoch == 1].set_index("trial_id")
    start = (starts.time - starts.epoch_seconds).min()
    span = epochs.time.max() - start
    busy = epochs.epoch_seconds.sum()
    in_trial = trials.wall_seconds.sum()
    return {
        "reuse_actors": reuse,
        "search wall s": wall,
        "span s": span,
        "busy s": busy,
        "busy / (span x slots)": busy / (span * slots),
        "busy / trial time": busy / in_trial,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    raw = yaml.safe_load((ROOT / "search_spaces/digits_quick.yaml").read_text())
    raw["teacher"]["checkpoint"] = str(ROOT / "teachers/digits_cnn.safetensors")
    raw["train"]["epochs"] = args.epochs or raw["train"]["epochs"]
    raw["early_stopping"] = {"enabled": False}
    raw["search"].update(trials=args.trials or raw["search"]["trials"], sampler="random")
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(yaml.safe_dump(raw))
        rows = [bench(space, Path(tmp) / "runs", reuse, slots=2) for reuse in (False, True)]
    df = pd.DataFrame(rows).set_index("reuse_actors")
    print(f"{raw['search']['trials']} trials of {raw['train']['epochs']} epochs, 1 CPU each, 2 slots")
    print(df.to_string(float_format=lambda v: f"{v:.3f}"))
    share = df.loc[True, "busy / (span x slots)"]
    print(
        f"kdsearch (reuse_actors=True): {share:.1%} of worker time in train/eval steps (goal >= 90%); "
        f"Ray's default: {df.loc[False, 'busy / (span x slots)']:.1%}"
    )


if __name__ == "__main__":
    main()
