"""How a trial ended: one vocabulary, one rule from its last result to it, one mapping to Optuna.

Used by the recorder (trials.parquet's `status` column), the searcher (what Optuna is told),
status, the report and the export. Nothing here imports Ray or Optuna.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from enum import Enum
from typing import Any


class Status(str, Enum):
    """A finished trial's outcome; the value is what trials.parquet stores."""

    COMPLETED = "completed"  # trained every epoch; its weights are saved
    STOPPED_EARLY = "stopped_early"  # the scheduler stopped it at a milestone (beaten by cheaper trials)
    INFEASIBLE = "infeasible"  # over the space's budget: never trained, costs exact, accuracy never measured
    FAILED = "failed"  # its own fault (diverged, out of memory, too slow), or raised past max_failures

    def __str__(self) -> str:
        return self.value

    @property
    def measured(self) -> bool:
        """Whether the trial trained and so has an accuracy (and measured objectives)."""
        return self in (Status.COMPLETED, Status.STOPPED_EARLY)


FAILURE = "failure"
"""The key of a trial's last result that says it failed on its own (diverged, out of memory, past
train.max_minutes) and why, in one line: the trial ended without raising, so it is not retried."""

RETRY_REFUSED = "retry_refused"
"""The key of a trial's last result when that attempt trained nothing because the trial's own
failures were past the space's max_failures (kdsearch.search.attempts): it ended the trial
with FAILURE, and it is not counted as a retry."""

STATUSES: tuple[str, ...] = tuple(s.value for s in Status)

OPTUNA_STATE: dict[Status, str] = {
    # the name of the optuna.trial.TrialState the sampler is told
    Status.COMPLETED: "COMPLETE",
    Status.INFEASIBLE: "COMPLETE",  # with its constraint values, so the sampler learns the budget
    Status.STOPPED_EARLY: "PRUNED",  # not COMPLETE with an early epoch's accuracy
    Status.FAILED: "FAIL",
}


def status_of(
    infeasible: bool, epochs_total: int, last_result: Mapping[str, Any] | None, errored: bool = False
) -> Status:
    """The outcome of a trial that has ended, from its config's two facts and its last result."""
    if errored or (last_result or {}).get(FAILURE):
        return Status.FAILED
    if infeasible:
        return Status.INFEASIBLE
    if not last_result:
        return Status.FAILED
    return Status.COMPLETED if int(last_result.get("epoch") or 0) >= epochs_total else Status.STOPPED_EARLY


def counts(statuses: list[str]) -> dict[str, int]:
    """How many trials ended each way, every status present (0 when none)."""
    out = dict.fromkeys(STATUSES, 0)
    for s in statuses:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def untrained_summary(rows: list[Mapping[str, Any]]) -> str | None:
    """One line for a finished search none of whose trials trained (each failed or was over the
    budget): how many ended each way and the most common failure with its count; None when
    some trial trained.

    Args:
        rows: trials.parquet's rows (their `status` and `error`).

    Returns:
        The line, or None.
    """
    if not rows or any(Status(r["status"]).measured for r in rows):
        return None
    ended = ", ".join(f"{n} {s}" for s, n in counts([r["status"] for r in rows]).items() if n)
    errors = Counter(
        (r.get("error") or "no error recorded").splitlines()[0] for r in rows if r["status"] == Status.FAILED
    )
    if not errors:
        return f"no trial trained: all {len(rows)} were over the budget ({ended})"
    error, n = errors.most_common(1)[0]
    return f"no trial trained ({ended}); the most common failure ({n} of {len(rows)}): {error}"
