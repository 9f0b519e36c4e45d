"""A run directory and its tables: trials.parquet (one row per trial) and epochs.parquet.

Both are rewritten whole, to a temporary file that is then renamed, so a reader (or a crash)
never sees a torn file. Rows are keyed by trial id, so writing the same trial twice (a
resumed search re-running a trial whose end was not saved) replaces it: the tables are
idempotent per trial.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError

STATUSES = ("completed", "stopped_early", "infeasible", "failed")

# Columns every trials.parquet has, before the config columns (student.*, recipe.*, ...)
TRIAL_COLUMNS = (
    "trial_id", "status", "val_acc", "best_val_acc", "flops", "macs", "params",
    "epochs", "epochs_total", "wall_seconds", "checkpoint", "error", "retries", "optuna_trial", "finished_at",
)
EPOCH_COLUMNS = (
    "trial_id", "epoch", "val_acc", "train_loss", "flops", "epoch_seconds", "images_per_second",
    "teacher_images", "lr", "time",
)


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives."""

    root: Path

    @property
    def space(self) -> Path:
        return self.root / "space.yaml"

    @property
    def meta(self) -> Path:
        return self.root / "run.json"

    @property
    def trials(self) -> Path:
        return self.root / "trials.parquet"

    @property
    def epochs(self) -> Path:
        return self.root / "epochs.parquet"

    @property
    def study(self) -> Path:
        return self.root / "study.db"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id


def write_table(rows: Iterable[dict[str, Any]], path: Path, first_columns: tuple[str, ...]) -> None:
    """Write rows as Parquet, atomically. Columns: `first_columns`, then the rest sorted."""
    rows = list(rows)
    names = list(first_columns) + sorted({k for r in rows for k in r} - set(first_columns))
    columns = {n: [r.get(n) for r in rows] for n in names}
    table = pa.table(columns) if rows else pa.table({n: pa.array([], pa.null()) for n in names})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet table as dicts ([] when the file does not exist yet)."""
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def open_run(path: str | os.PathLike) -> RunPaths:
    """A run directory that exists and holds a run; one clear error otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise KdsearchError(f"{path}: no such run directory")
    paths = RunPaths(root.resolve())
    if not paths.meta.exists() and not paths.trials.exists():
        raise KdsearchError(f"{path}: is not a kdsearch run (no run.json or trials.parquet inside)")
    return paths
