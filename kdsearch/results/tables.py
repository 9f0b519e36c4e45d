"""A run and its tables: trials.parquet (one row per trial), epochs.parquet and, once `kdsearch
confirm` has retrained front members with several seeds, confirm.parquet; `load_run`
reads a run back (from a folder or a URI), `front_records` says what a front member's row shows.

A run lives in a `kdsearch.storage.Storage`: a local folder or a bucket prefix. The search
appends to trials.parquet and epochs.parquet as parts (kdsearch.results.parts: the layout, the
rule and its compaction), so its cost per trial stays flat; every file is written whole
(locally to a temporary file then renamed, in a bucket by one PUT), so a reader (or a crash)
never sees a torn one. Rows are keyed by trial id (epochs: by trial id and epoch), and a
later row replaces an earlier one of the same key (a resumed search re-running a trial whose
end was not saved, a retried trial's epochs): the tables are idempotent per trial.
`read_rows` (and `RunPaths.rows`) is the one way to read a table: it applies that rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.parts import Rows, read_table_rows, to_parquet
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import DEFAULT_OBJECTIVES, Pairs
from kdsearch.space.specs import RecipeSpec, StudentSpec
from kdsearch.storage import Storage, first_line

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
    "checkpoint_epoch",
    "error",
    "retries",
    "optuna_trial",
    "finished_at",
    "node_id",
    "host",
    "gpu",
    "gpu_ids",
    "world_size",
)
EPOCH_COLUMNS = (
    "trial_id",
    "epoch",
    "val_acc",
    "train_loss",
    "flops",
    "epoch_seconds",
    "images_per_second",
    "data_wait_share",
    "peak_memory",
    "mfu",
    "teacher_images",
    "lr",
    "time",
    "node_id",  # the Ray node the epoch ran on (a retry after a lost node runs on another)
    "gpu_ids",  # Ray's ids of the GPUs it held on that node ("0,1"; "" for none)
)
# Columns every confirm.parquet has first (one row per retraining of a trial with one seed);
# then every objective of the run, then the original trial's config columns, sorted
CONFIRM_COLUMNS = (
    "trial_id",
    "seed",
    "confirm_id",
    "status",
    "val_acc",
    "test_acc",
    "epochs",
    "wall_seconds",
    "error",
    "finished_at",
)
# Columns every study.parquet has first (`kdsearch study`: one row per trial, resolution, mode and
# seed); then the member's config columns at the studied resolution, sorted
STUDY_COLUMNS = (
    "trial_id",
    "pos_embed",
    "img_size",
    "trained_img_size",
    "mode",
    "seed",
    "status",
    "val_acc",
    "test_acc",
    "flops",
    "params",
    "finetune_epochs",
    "weights",
    "wall_seconds",
    "error",
    "finished_at",
)
# The config columns that describe a student (its data fixes the others) and its recipe
ARCH_COLUMNS = tuple(
    f"student.{f.name}" for f in fields(StudentSpec) if f.name not in ("img_size", "in_chans", "num_classes")
)
RECIPE_COLUMNS = tuple(f"recipe.{f.name}" for f in fields(RecipeSpec))


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives: a storage (a folder or a bucket prefix) and the names
    of its files, relative to it (so a run can be copied or moved, and read from anywhere)."""

    store: Storage

    SPACE = "space.yaml"
    META = "run.json"
    TRIALS = "trials.parquet"
    EPOCHS = "epochs.parquet"
    CONFIRM = "confirm.parquet"
    STUDY = "study.db"  # the searcher's Optuna study
    RESOLUTIONS = "study.parquet"  # `kdsearch study`'s rows: encodings across resolutions
    TUNE = "tune"

    @classmethod
    def at(cls, location: str | os.PathLike | Storage) -> RunPaths:
        """The run at `location` (a folder, a URI or an opened Storage); nothing is read."""
        return cls(location if isinstance(location, Storage) else Storage.open(location))

    @property
    def name(self) -> str:
        """The run's name: the last part of its location."""
        return self.store.name

    @property
    def uri(self) -> str:
        """The run's location as the user gives it (a folder or a URI)."""
        return self.store.uri

    @staticmethod
    def trial_dir(trial_id: str) -> str:
        """A trial's folder, relative to the run."""
        return f"trials/{trial_id}"

    @staticmethod
    def checkpoint(trial_id: str) -> str:
        """A trial's weights, relative to the run."""
        return f"trials/{trial_id}/model.safetensors"

    def rows(self, name: str) -> list[dict[str, Any]]:
        """The rows of one of the run's tables ([] before it exists)."""
        return read_rows(self.store, name)

    def meta(self) -> dict[str, Any]:
        """run.json ({} before it exists); one clear error when it is not what kdsearch writes."""
        if not self.store.exists(self.META):
            return {}
        where = self.store.uri_of(self.META)
        try:
            meta = json.loads(self.store.read_text(self.META))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise KdsearchError(f"{where}: is not readable JSON (truncated or corrupt: {first_line(e)})") from None
        problem = _meta_problem(meta)
        if problem:
            raise KdsearchError(f"{where}: {problem}")
        return meta


def _meta_problem(meta: Any) -> str:
    """What is wrong with the fields of run.json that the views read ("" when nothing)."""
    if not isinstance(meta, dict):
        return f"must be a JSON object, got {type(meta).__name__}"
    objectives = meta.get("objectives", [])
    if not isinstance(objectives, list) or not all(
        isinstance(o, list) and len(o) == 2 and o[0] in objective_table.OBJECTIVES and o[1] in objective_table.MODES
        for o in objectives
    ):
        return f"objectives must be a list of [metric, max|min] pairs, got {objectives!r}"
    trials = meta.get("trials", 1)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        return f"trials must be an integer >= 1, got {trials!r}"
    started = meta.get("started", 0)
    if not isinstance(started, (int, float)) or isinstance(started, bool):
        return f"started must be a time in seconds, got {started!r}"
    reference = meta.get("hypervolume_reference") or {}
    if not isinstance(reference, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in reference.values()
    ):
        return f"hypervolume_reference must map metrics to numbers, got {reference!r}"
    return ""


def write_table(rows: Iterable[dict[str, Any]], store: Storage, name: str, first_columns: tuple[str, ...]) -> None:
    """Write rows as Parquet, whole or not at all. Columns: `first_columns`, then the rest sorted."""
    store.write_bytes(name, to_parquet(list(rows), first_columns))


def latest_trials(rows: Rows) -> Rows:
    """trials.parquet's rule: a later row of a trial replaces the earlier one; by trial id."""
    return sorted({r["trial_id"]: r for r in rows}.values(), key=lambda r: r["trial_id"])


def latest_epochs(rows: Rows) -> Rows:
    """epochs.parquet's rule: a later row (trial, e) replaces the trial's rows at epochs >= e
    (a retry trains them again, from epoch 1 or after its last checkpoint); by trial, epoch."""
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        curve = curves.setdefault(r["trial_id"], {})
        e = r["epoch"]
        if curve and e <= max(curve):
            curve = curves[r["trial_id"]] = {k: v for k, v in curve.items() if k < e}
        curve[e] = r
    return [r for tid in sorted(curves) for _, r in sorted(curves[tid].items())]


# tables written as parts (kdsearch.results.parts) -> their rule
MERGE_RULES = {"trials.parquet": latest_trials, "epochs.parquet": latest_epochs}


def read_rows(store: Storage, name: str) -> list[dict[str, Any]]:
    """Rows of a table as dicts ([] when it does not exist yet): the compacted file and, for a
    table written as parts, the parts after it, folded by the table's rule; one clear error when
    one of them is not a readable Parquet file."""
    try:
        return read_table_rows(store, name, MERGE_RULES.get(name))
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: a torn or foreign file, never a traceback
        raise KdsearchError(
            f"{store.uri_of(name)}: is not a readable Parquet table (truncated or corrupt: {first_line(e)})"
        ) from None


def write_json(store: Storage, name: str, obj: Any) -> None:
    """Write `obj` as indented JSON to `name` in `store` (whole; values JSON lacks as str)."""
    store.write_text(name, json.dumps(obj, indent=2, default=str))


def open_run(location: str | os.PathLike) -> RunPaths:
    """A run (a folder or a URI) that exists and holds a run; one clear error otherwise."""
    paths = RunPaths.at(location)
    if not paths.store.is_dir() and not paths.store.exists(RunPaths.META):
        raise KdsearchError(f"{location}: no such run directory")
    if not paths.store.exists(RunPaths.META) and not paths.store.exists(RunPaths.TRIALS):
        raise KdsearchError(f"{location}: is not a kdsearch run (no run.json or trials.parquet inside)")
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
        """The run's name."""
        return self.paths.name


def load_run(path: str | os.PathLike, objectives: Sequence[str] | None = None) -> Run:
    """A run's files; `objectives` (e.g. ["val_acc", "params"], a direction after a colon
    where the table's default is not wanted) overrides the run's own."""
    paths = open_run(path)
    meta = paths.meta()
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
    trials = paths.rows(RunPaths.TRIALS)
    if objectives and trials:
        recorded = {k for r in trials for k, v in r.items() if v is not None}
        missing = [name for name, _ in objs if name not in recorded]
        if missing:
            have = [name for name in objective_table.OBJECTIVES if name in recorded]
            raise KdsearchError(f"--objectives: the run recorded no {missing[0]}; it has {', '.join(have)}")
    return Run(paths, meta, trials, paths.rows(RunPaths.EPOCHS), objs)


def require_finished(run: Run) -> None:
    """KdsearchError, saying how many trials are recorded, when no trial of `run` has completed."""
    if not any(r["status"] == Status.COMPLETED for r in run.trials):
        raise KdsearchError(
            f"{run.paths.uri}: no finished trial yet ({len(run.trials)} recorded); wait for one or check `kdsearch status`"
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
