"""A run directory and its tables: trials.parquet (one row per trial) and epochs.parquet;
`load_run` reads a run back, `front_records` says what a front member's row shows.

Both are rewritten whole, to a temporary file that is then renamed, so a reader (or a crash)
never sees a torn file. Rows are keyed by trial id, so writing the same trial twice (a
resumed search re-running a trial whose end was not saved) replaces it: the tables are
idempotent per trial.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, Pairs
from kdsearch.space.specs import RecipeSpec, StudentSpec

# Columns every trials.parquet has first; then any other objective, then the config columns
# (student.*, recipe.*, train.*, data.*, teacher.*), sorted
TRIAL_COLUMNS = (
    "trial_id",
    "status",
    "val_acc",
    "best_val_acc",
    "flops",
    "macs",
    "params",
    "epochs",
    "epochs_total",
    "wall_seconds",
    "checkpoint",
    "error",
    "retries",
    "optuna_trial",
    "finished_at",
)
EPOCH_COLUMNS = (
    "trial_id",
    "epoch",
    "val_acc",
    "train_loss",
    "flops",
    "epoch_seconds",
    "images_per_second",
    "teacher_images",
    "lr",
    "time",
)
# The config columns that describe a student (its data fixes the others) and its recipe
ARCH_COLUMNS = tuple(
    f"student.{f.name}" for f in fields(StudentSpec) if f.name not in ("img_size", "in_chans", "num_classes")
)
RECIPE_COLUMNS = tuple(f"recipe.{f.name}" for f in fields(RecipeSpec))


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


@dataclass
class Run:
    """A run as its files hold it: run.json, both tables, and the objectives it is judged by."""

    paths: RunPaths
    meta: dict[str, Any]
    trials: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    objectives: list[tuple[str, str]]

    @property
    def name(self) -> str:
        return self.paths.root.name


def load_run(path: str | os.PathLike, objectives: Sequence[str] | None = None) -> Run:
    """A run's files; `objectives` (e.g. ["val_acc", "params"], a direction after a colon
    where the table's default is not wanted) overrides the run's own."""
    paths = open_run(path)
    meta = json.loads(paths.meta.read_text()) if paths.meta.exists() else {}
    objs = [(m, d) for m, d in meta.get("objectives", DEFAULT_OBJECTIVES)]
    if objectives:
        try:
            objs = objective_table.parse_pairs(objectives)
        except KeyError as e:
            raise KdsearchError(
                f"--objectives: unknown {e.args[0]!r}; allowed: {', '.join(objective_table.OBJECTIVES)}"
            ) from None
        except ValueError as e:
            raise KdsearchError(f"--objectives: {e}") from None
    return Run(paths, meta, read_rows(paths.trials), read_rows(paths.epochs), objs)


def require_finished(run: Run) -> None:
    if not any(r["status"] == Status.COMPLETED for r in run.trials):
        raise KdsearchError(
            f"{run.paths.root}: no finished trial yet ({len(run.trials)} recorded); wait for one or check `kdsearch status`"
        )


def front_records(front: Sequence[dict[str, Any]], objectives: Pairs, recipe: bool = True) -> list[dict[str, Any]]:
    """What every view shows of each front member (JSON, CSV, tables, the report): its id,
    every objective, FLOPs, MACs and params, its architecture and, with `recipe`, its recipe;
    raw values, config keys without their section."""
    costs = [c for c in objective_table.names("computed") if c not in dict(objectives)]
    columns = [name for name, _ in objectives] + costs
    config = ARCH_COLUMNS + (RECIPE_COLUMNS if recipe else ())
    return [
        {
            "trial_id": r["trial_id"],
            **{c: _plain(r.get(c)) for c in columns},
            **{k.split(".", 1)[1]: _plain(r.get(k)) for k in config},
        }
        for r in front
    ]


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
