"""The embedded default trial: wall time and val accuracy, with the teacher's logits cached
against the plain baseline that runs the teacher on every batch.

    .venv/bin/python benchmarks/trial_digits.py

Goals (issue 3): `kdsearch trial search_spaces/digits_quick.yaml` finishes in under 60 s on
2 CPU cores and reaches at least 95% val accuracy; with the cache, teacher_images is 0.
Every figure printed here is measured in this run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "digits_quick.yaml"
KDSEARCH = Path(sys.executable).with_name("kdsearch")


def cli_trial(*extra: str) -> tuple[dict, float]:
    """`kdsearch trial` in its own process, as a user runs it; wall time includes start-up."""
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(KDSEARCH), "trial", str(SPACE), "--json", "--workdir", workdir, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout), wall


def live_baseline() -> tuple[dict, float]:
    """The same trial with the teacher run live on every batch (no cache)."""
    from kdsearch.space.file import load_space
    from kdsearch.train.trial import TrialSetup, run_trial

    space = load_space(SPACE)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = run_trial(space.default_spec(), TrialSetup(workdir=workdir, live_teacher=True), lambda m: None)
        return result, time.perf_counter() - t0


def main() -> None:
    subprocess.run([str(KDSEARCH), "teacher", "train", str(SPACE)], check=True, cwd=ROOT)  # once, if missing
    first, first_wall = cli_trial()  # may fill the logit cache
    cached, cached_wall = cli_trial()
    live, live_wall = live_baseline()
    print(f"{'run':<34} {'wall s':>7} {'train s':>8} {'val_acc':>8} {'teacher_images':>15}")
    for name, r, wall in [
        ("kdsearch trial (first, cache fill)", first, first_wall),
        ("kdsearch trial (cached logits)", cached, cached_wall),
        ("run_trial, live teacher (baseline)", live, live_wall),
    ]:
        print(f"{name:<34} {wall:>7.1f} {r['wall_seconds']:>8.1f} {r['val_acc']:>8.4f} {r['teacher_images']:>15,}")
    print(
        f"goal: wall < 60 s -> {'met' if cached_wall < 60 else 'NOT met'}; val_acc >= 0.95 -> {'met' if cached['val_acc'] >= 0.95 else 'NOT met'}"
    )
    print(
        f"cache speed-up of the training loop over the live teacher: {live['wall_seconds'] / cached['wall_seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
