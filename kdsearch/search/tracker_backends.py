"""The experiment trackers `--track` writes to: MLflow, Weights & Biases and TensorBoard.

Each backend is plain Python over its library's public API and runs in the tracking
callback's one background thread (kdsearch.search.trackers), never in Tune's loop. Each makes
one tracker run per trial, grouped under the search, and reads its settings from the
library's own environment variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
WANDB_PROJECT, WANDB_MODE, WANDB_DIR, ...); kdsearch states only the defaults those leave open
(the experiment or project: the space's name; the group: the run's name).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdsearch.storage import Storage


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker groups the trials under: the search (or confirmation) and where it lives."""

    name: str  # the parent run's name, the W&B group: the run's name ("digits_search", "digits_search-confirm")
    experiment: str  # the MLflow experiment and W&B project when their variables leave them unset: the space's name
    store: Storage  # the run's storage
    folder: str  # TensorBoard's folder in the run ("tensorboard", "tensorboard/confirm")


def front_table(front: list[dict[str, Any]], objectives: list[str]) -> tuple[list[str], list[list[Any]]]:
    """The front's rows as a table: the trial, its objectives and its config columns.

    Args:
        front: the front's trials table rows.
        objectives: the run's objective names.

    Returns:
        The columns and one list of plain values per front member.
    """
    spec = sorted({k for r in front for k in r if k.split(".")[0] in ("student", "recipe", "train")})
    columns = ["trial_id", *objectives, *spec]
    return columns, [[_plain(r.get(c)) for c in columns] for r in front]


def as_csv(columns: list[str], rows: list[list[Any]]) -> str:
    """A table as CSV text (a header, then one line per row)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MlflowTracker:
    """A parent run named as the search and one child run per trial (tag mlflow.parentRunId),
    through MlflowClient with explicit run ids: several trials log at once, never through
    MLflow's one global active run."""

    name = "mlflow"

    def start(self, run: TrackedRun) -> None:
        from mlflow import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's own default
        _probe(self.client.tracking_uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.experiment
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {MLFLOW_RUN_NAME: run.name, "kdsearch_run": run.store.uri_of()}
        self.parent = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags).info.run_id
        self.runs: dict[str, str] = {}

    def trial_start(self, key: str, name: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        tags = {"mlflow.parentRunId": self.parent, "kdsearch_trial_id": key}
        run_id = self.runs[key] = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def epoch(self, key: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.runs[key], metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def trial_end(self, key: str, status: str, objectives: dict[str, float]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id, now = self.runs[key], _millis()
        finals = [Metric(f"final.{k}", v, now, 0) for k, v in objectives.items()]
        self.client.log_batch(run_id, metrics=finals, tags=[RunTag("status", status)])
        self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")

    def end(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if summary.get("columns"):
            self.client.log_text(self.parent, as_csv(summary["columns"], summary["rows"]), "front.csv")
            records = [dict(zip(summary["columns"], r)) for r in summary["rows"]]
            self.client.log_text(self.parent, json.dumps(records, indent=1), "front.json")
        history = [Metric("hypervolume", v, _millis(), n) for n, v in summary.get("history", [])]
        if history:
            self.client.log_batch(self.parent, metrics=history)
        self.client.set_terminated(self.parent, "FINISHED")


class WandbTracker:
    """One W&B run per trial in the group named as the search, and one run (job_type
    "summary") for the search's front and hypervolume; several runs at once in this process
    (wandb.init's reinit="create_new", wandb >= 0.19.10)."""

    name = "wandb"

    def start(self, run: TrackedRun) -> None:
        import wandb

        self.wandb, self.run = wandb, run
        self.runs: dict[str, Any] = {}
        # the driver's console stays the search's; no system metrics per trial run (the trials train elsewhere)
        self.settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, reinit="create_new")
        self.summary = self._init(f"{run.name}-summary", "summary", {"kdsearch_run": run.store.uri_of()})

    def _init(self, name: str, job_type: str, config: dict[str, Any]) -> Any:
        return self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or self.run.experiment,
            group=self.run.name,
            name=name,
            job_type=job_type,
            config=config,
            settings=self.settings,
        )

    def trial_start(self, key: str, name: str, params: dict[str, Any]) -> None:
        self.runs[key] = self._init(name, "trial", params)

    def epoch(self, key: str, step: int, metrics: dict[str, float]) -> None:
        self.runs[key].log(metrics, step=step)

    def trial_end(self, key: str, status: str, objectives: dict[str, float]) -> None:
        run = self.runs.pop(key)
        run.summary.update({"status": status, **{f"final.{k}": v for k, v in objectives.items()}})
        run.finish(exit_code=1 if status == "failed" else 0)

    def end(self, summary: dict[str, Any]) -> None:
        run = self.summary
        for n, v in summary.get("history", []):
            run.log({"hypervolume": v}, step=n)
        if summary.get("columns"):
            run.log({"front": self.wandb.Table(columns=summary["columns"], data=summary["rows"])})
        run.summary.update({"hypervolume": summary.get("hypervolume")})
        run.finish()
        for run in self.runs.values():  # trials that never ended (an interrupted search)
            run.finish(exit_code=1)


class TensorboardTracker:
    """One event-file folder per trial, RUN/tensorboard/TRIAL, and the search's own (its
    hypervolume, the front as text and front.csv) in RUN/tensorboard. A run in a bucket is
    written to a local temporary folder, and each trial's folder uploaded when it ends."""

    name = "tensorboard"

    def start(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.SummaryWriter, self.run = SummaryWriter, run
        local = run.store.local_path(run.folder)
        self._tmp = None if local is not None else tempfile.TemporaryDirectory(prefix="kdsearch-tensorboard-")
        self.root = local if local is not None else Path(self._tmp.name)
        self.writers: dict[str, Any] = {}
        self.params: dict[str, dict[str, Any]] = {}

    def trial_start(self, key: str, name: str, params: dict[str, Any]) -> None:
        writer = self.writers[key] = self.SummaryWriter(str(self.root / name))
        self.params[key] = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def epoch(self, key: str, step: int, metrics: dict[str, float]) -> None:
        writer = self.writers[key]
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)

    def trial_end(self, key: str, status: str, objectives: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self.writers.pop(key)
        finals = {f"final/{k}": v for k, v in objectives.items()}
        for summary in hparams({**self.params.pop(key), "status": status}, finals):  # the HParams tab
            writer.file_writer.add_summary(summary)
        for k, v in finals.items():
            writer.add_scalar(k, v, 0)
        writer.add_text("status", status)
        writer.close()
        self._upload(Path(writer.log_dir))

    def end(self, summary: dict[str, Any]) -> None:
        writer = self.SummaryWriter(str(self.root))
        for n, v in summary.get("history", []):
            writer.add_scalar("hypervolume", v, n)
        if summary.get("columns"):
            columns, rows = summary["columns"], summary["rows"]
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            writer.add_text("front", "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]))
            (self.root / "front.csv").write_text(as_csv(columns, rows))
        writer.close()
        for open_writer in self.writers.values():  # trials that never ended (an interrupted search)
            open_writer.close()
        self._upload(self.root, recursive=False)  # the trials' folders went up as each ended
        if self._tmp is not None:
            self._tmp.cleanup()

    def _upload(self, folder: Path, recursive: bool = True) -> None:
        """A bucket's copy of `folder`'s files (those in its subfolders too when `recursive`), when
        the run lives in a bucket."""
        if self._tmp is None:
            return
        for f in folder.rglob("*") if recursive else folder.glob("*"):
            if f.is_file():
                self.run.store.upload(f, f"{self.run.folder}/{f.relative_to(self.root).as_posix()}")


BACKENDS: dict[str, type] = {"mlflow": MlflowTracker, "wandb": WandbTracker, "tensorboard": TensorboardTracker}
"""Each `--track` name -> its backend."""


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _probe(uri: str) -> None:
    """An HTTP tracking server answers one request within 10 s (any HTTP status will do), else
    ConnectionError: MLflow's client retries an unreachable server for minutes on every call."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"{uri} does not answer ({reason})") from None
