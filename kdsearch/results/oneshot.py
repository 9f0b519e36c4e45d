"""What a one-shot run's files say (`search.strategy: oneshot`): its three stages and their times,
the supernet's epochs, the screened subnets and, for every trained student, its inherited val
accuracy against its trained one, with Kendall's tau over those pairs.

The files are the search's (kdsearch.search.oneshot), under the run's `oneshot/` folder:
stages.json (each stage's start, end and progress), supernet_epochs.parquet (one row per
supernet epoch) and screening.parquet (one row per scored subnet). A trained trial's subnet is
the screening row whose student.* columns equal the trial's. The search writes screening.parquet
by parts while it screens (kdsearch.results.parts; `latest_subnets` is its rule), so
`read_screening` sees the rows scored so far. `load_oneshot` reads them for the
report (kdsearch.results.oneshot_report); `stage_status` is the stage line of `kdsearch status`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.parts import Rows, read_table_rows
from kdsearch.results.tables import RunPaths
from kdsearch.storage import first_line

FOLDER = "oneshot"
STAGES = f"{FOLDER}/stages.json"
SUPERNET_EPOCHS = f"{FOLDER}/supernet_epochs.parquet"
SCREENING = f"{FOLDER}/screening.parquet"
SUPERNET = f"{FOLDER}/supernet.pt"


@dataclass
class OneShot:
    """A one-shot run's stages, supernet epochs, screening rows and trained students.

    `trained` holds one dict per completed trial whose student was screened: trial_id,
    subnet_id, inherited_val_acc, val_acc (trained) and its student.* columns. `unmatched`
    counts the completed trials whose student no screening row holds (Optuna's own samples past
    the kept subnets). Seconds and shares are None where a stage has not started.
    """

    stages: dict[str, Any]
    supernet_epochs: list[dict[str, Any]]
    screening: list[dict[str, Any]]
    trained: list[dict[str, Any]]
    unmatched: int
    kendall_tau: float | None
    tau_n: int
    tau_pvalue: float | None
    run_seconds: float
    seconds: dict[str, float | None] = field(default_factory=dict)  # setup, supernet, screening, training

    def share(self, stage: str) -> float | None:
        """The share of the run's wall time that `stage` took (None before it started)."""
        s = self.seconds.get(stage)
        return None if s is None or self.run_seconds <= 0 else s / self.run_seconds

    @property
    def supernet_share(self) -> float | None:
        """The supernet's share of the run's wall time."""
        return self.share("supernet")

    @property
    def screening_share(self) -> float | None:
        """The screening's share of the run's wall time."""
        return self.share("screening")

    @property
    def kept(self) -> int:
        """How many screened subnets were kept for training."""
        return sum(1 for r in self.screening if r.get("kept") is not None and r["kept"] >= 0)


def is_oneshot(paths: RunPaths) -> bool:
    """Whether the run has a oneshot/ folder (a `search.strategy: oneshot` run)."""
    return paths.store.is_dir(FOLDER) or paths.store.exists(STAGES)


def read_stages(paths: RunPaths) -> dict[str, Any]:
    """oneshot/stages.json ({} before it exists); one clear error when it is not a JSON object."""
    if not paths.store.exists(STAGES):
        return {}
    try:
        stages = json.loads(paths.store.read_text(STAGES))
    except ValueError as e:
        raise KdsearchError(f"{paths.store.uri_of(STAGES)}: is not readable JSON ({e})") from None
    if not isinstance(stages, dict):
        raise KdsearchError(f"{paths.store.uri_of(STAGES)}: must be a JSON object, got {type(stages).__name__}")
    return {k: v for k, v in stages.items() if isinstance(v, dict)}


def latest_subnets(rows: Rows) -> Rows:
    """screening.parquet's rule: a later row of a subnet_id replaces the earlier; by subnet_id."""
    by_id = {int(r["subnet_id"]): r for r in rows}
    return [by_id[i] for i in sorted(by_id)]


def read_screening(paths: RunPaths) -> Rows:
    """screening.parquet's rows, its parts folded in ([] before it exists); one clear error
    when a file of it is not readable Parquet."""
    try:
        return read_table_rows(paths.store, SCREENING, latest_subnets)
    except (pa.ArrowException, OSError) as e:
        raise KdsearchError(
            f"{paths.store.uri_of(SCREENING)}: is not a readable Parquet table (truncated or corrupt: {first_line(e)})"
        ) from None


def load_oneshot(paths: RunPaths, now: float | None = None) -> OneShot | None:
    """A one-shot run's stages, supernet epochs, screening and trained students; None for a
    standard run (no oneshot/ folder).

    Args:
        paths: The run.
        now: The time a stage that goes on is measured to [default: now; a run that ended: its end].

    Returns:
        The OneShot, or None.
    """
    if not is_oneshot(paths):
        return None
    meta = paths.meta()
    stages = read_stages(paths)
    screening = read_screening(paths)
    trials = paths.rows(RunPaths.TRIALS)
    trained, unmatched = inherited_pairs(trials, screening)
    tau, n, p = kendall_tau([t["inherited_val_acc"] for t in trained], [t["val_acc"] for t in trained])
    started = float(meta.get("started", 0.0))
    end = float(meta["ended"]) if meta.get("ended") is not None else (now or time.time())
    return OneShot(
        stages=stages,
        supernet_epochs=sorted(paths.rows(SUPERNET_EPOCHS), key=lambda r: r.get("epoch") or 0),
        screening=screening,
        trained=trained,
        unmatched=unmatched,
        kendall_tau=tau,
        tau_n=n,
        tau_pvalue=p,
        run_seconds=end - started,
        seconds=stage_seconds(stages, started, end),
    )


def stage_seconds(stages: Mapping[str, Any], started: float, end: float) -> dict[str, float | None]:
    """How long each stage took (or has taken by `end`): setup (the run's start to the
    supernet's: data, the teacher's logits), supernet, screening, training (the screening's end
    to `end`); None for a stage not started.

    Args:
        stages: stages.json.
        started: The run's start (run.json's `started`).
        end: The run's end, or now while it goes on.

    Returns:
        {"setup", "supernet", "screening", "training"} -> seconds or None.
    """
    sup, scr = stages.get("supernet") or {}, stages.get("screening") or {}

    def span(stage: Mapping[str, Any]) -> float | None:
        if stage.get("started") is None:
            return None
        return (stage["ended"] if stage.get("ended") is not None else end) - stage["started"]

    return {
        "setup": sup["started"] - started if sup.get("started") is not None else None,
        "supernet": span(sup),
        "screening": span(scr),
        "training": end - scr["ended"] if scr.get("ended") is not None else None,
    }


def student_key(row: Mapping[str, Any], columns: Sequence[str]) -> tuple:
    """The values of `columns` in `row`, plain Python (so a trial's and a subnet's compare)."""
    return tuple(v.item() if hasattr(v, "item") else v for v in (row.get(c) for c in columns))


def inherited_pairs(
    trials: Sequence[dict[str, Any]], screening: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Each completed trial with its subnet's inherited val accuracy beside its trained one.

    A trial's subnet is the screening row whose student.* columns (those screening.parquet
    has) equal the trial's; of several equal rows, the kept one (the first kept), else the first.

    Args:
        trials: trials.parquet's rows.
        screening: screening.parquet's rows.

    Returns:
        ([{trial_id, subnet_id, inherited_val_acc, val_acc, student.*...}] in trial order, how
        many completed trials no screening row holds).
    """
    columns = sorted({k for r in screening for k in r if k.startswith("student.")})
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in sorted(screening, key=_kept_order):
        by_key.setdefault(student_key(r, columns), r)
    pairs, unmatched = [], 0
    for t in trials:
        if t.get("status") != Status.COMPLETED or not _finite(t.get("val_acc")):
            continue
        sub = by_key.get(student_key(t, columns)) if columns else None
        if sub is None or not _finite(sub.get("inherited_val_acc")):
            unmatched += 1
            continue
        pairs.append(
            {
                "trial_id": t["trial_id"],
                "subnet_id": sub.get("subnet_id"),
                "inherited_val_acc": float(sub["inherited_val_acc"]),
                "val_acc": float(t["val_acc"]),
                **{c: t.get(c) for c in columns},
            }
        )
    return pairs, unmatched


def _kept_order(row: Mapping[str, Any]) -> tuple[int, int]:
    kept = row.get("kept")
    return (0, int(kept)) if kept is not None and kept >= 0 else (1, 0)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def kendall_tau(inherited: Sequence[float], trained: Sequence[float]) -> tuple[float | None, int, float | None]:
    """Kendall's tau-b (ties counted as scipy.stats.kendalltau counts them) between inherited
    and trained accuracies: how far the screening ranks students as training does.

    Args:
        inherited: Each trained student's inherited val accuracy.
        trained: Its trained val accuracy, in the same order.

    Returns:
        (tau, n, two-sided p-value); tau and p are None with fewer than 3 pairs or when either
        side has one value only (no ranking to agree with).
    """
    from scipy.stats import kendalltau

    n = len(inherited)
    if n < 3 or len(set(inherited)) < 2 or len(set(trained)) < 2:
        return None, n, None
    result = kendalltau(inherited, trained)
    return float(result.statistic), n, float(result.pvalue)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stage_status(
    stages: Mapping[str, Any], now: float, ended: float | None = None, started: float | None = None
) -> dict[str, Any]:
    """Where a one-shot run stands: its stage, that stage's progress and elapsed time.

    Args:
        stages: stages.json (`read_stages`).
        now: The time to measure elapsed time to.
        ended: run.json's `ended` when the search has ended (its stages are then all said with
            their durations).
        started: run.json's `started`: the setup stage's start (its time is not said without it).

    Returns:
        {"stage": "setup" | "supernet" | "screening" | "training" | "ended", "stage_seconds",
        "line": one line for a terminal, "supernet", "screening": stages.json's entries}.
    """
    sup, scr = stages.get("supernet") or {}, stages.get("screening") or {}
    end = float(ended) if ended is not None else now
    secs = stage_seconds(stages, end if started is None else float(started), end)
    done = []
    if sup.get("ended") is not None:
        done.append(f"supernet took {_hms(secs['supernet'])} ({sup.get('epochs')} epochs)")
    if scr.get("ended") is not None:
        done.append(f"screening took {_hms(secs['screening'])} ({scr.get('scored')} subnets)")
    if sup.get("started") is None:
        stage, seconds = "setup", None if started is None else end - float(started)
        what = "one-shot stage 0 of 3: preparing the data and the teacher's logits"
    elif sup.get("ended") is None:
        stage, seconds = "supernet", secs["supernet"]
        what = f"one-shot stage 1 of 3: supernet, epoch {sup.get('epochs', 0)} of {sup.get('of', '?')} trained"
    elif scr.get("ended") is None:
        stage, seconds = "screening", secs["screening"]
        what = f"one-shot stage 2 of 3: screening, {scr.get('scored', 0)} of {scr.get('of', '?')} subnets scored"
    else:
        stage, seconds, what = "training", secs["training"], "one-shot stage 3 of 3: training the kept students"
    if ended is not None and stage == "training":
        stage, what = "ended", "one-shot: ended after its training stage"
    took = "took" if ended is not None else "elapsed"
    line = what + (f", {took} {_hms(seconds)}" if seconds is not None else "")
    line += f" ({'; '.join(done)})" if done else ""
    return {"stage": stage, "stage_seconds": seconds, "line": line, "supernet": sup or None, "screening": scr or None}


def run_stage(paths: RunPaths, meta: Mapping[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """`stage_status` of a run from its files; None for a standard run.

    Args:
        paths: The run.
        meta: Its run.json.
        now: The time to measure elapsed time to [default: now].

    Returns:
        `stage_status`'s dict, or None.
    """
    if not is_oneshot(paths):
        return None
    return stage_status(read_stages(paths), now or time.time(), meta.get("ended"), meta.get("started"))
