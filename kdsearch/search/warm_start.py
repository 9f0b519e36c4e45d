"""Steering a search: configs to try first, and what earlier trials taught.

    enqueue_configs      the space's `search.enqueue`: Optuna's enqueue_trial, in order, so the
                         first trials are the configs the team already knows (DeiT-Tiny, ...)
    add_earlier_trials   an earlier run's trials (`--from RUN`), or this run's own when a finished
                         run is extended (`--resume --trials N`), told to the new study as
                         finished trials: the sampler starts from what they measured

An earlier trial is replayed through the space itself: `SearchSpace.suggest` on an
`optuna.trial.FixedTrial` holding the row's values yields the very distributions and budget
constraints a trial of this space has, so the added trial is indistinguishable, to the
sampler, from one it ran. Rows whose values this space does not allow, or that lack one of
its objectives, are skipped (and counted).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from kdsearch.results.outcomes import OPTUNA_STATE, Status
from kdsearch.space.objectives import Pairs, values_for_sampler
from kdsearch.space.search_space import SearchSpace


def enqueue_configs(study: optuna.Study, space: SearchSpace) -> int:
    """Enqueue the space's `search.enqueue` configs (dimensions they leave out are sampled).

    Args:
        study: the searcher's study (`KdsearchSearcher.study`).
        space: the search space, whose `search.enqueue` lists the configs.

    Returns:
        How many configs were enqueued.
    """
    for config in space.search.enqueue:
        study.enqueue_trial(dict(config))
    return len(space.search.enqueue)


@dataclass(frozen=True)
class WarmStart:
    """What `add_earlier_trials` added, and the rows it skipped by reason."""

    added: int
    skipped: dict[str, int]  # why -> how many rows

    def describe(self, source: str) -> str:
        why = "; ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n)
        return f"the sampler starts from {self.added} trials of {source}" + (f" (skipped {why})" if why else "")


def add_earlier_trials(
    study: optuna.Study, space: SearchSpace, rows: Sequence[dict[str, Any]], objectives: Pairs, sampler: Any
) -> WarmStart:
    """Add earlier trials (trials.parquet rows) to `study` as finished trials of this space.

    Completed and infeasible trials enter as COMPLETE with their values (an infeasible one with
    its constraints and each measured objective at its worst, as the searcher tells them),
    early-stopped ones as PRUNED; failed ones are left out. For a genetic sampler (NSGA-II) the
    added trials form generation 0, so its first new generation is bred from them rather than
    drawn at random.

    Args:
        study: the searcher's study (`KdsearchSearcher.study`), before its first trial.
        space: this run's search space; a row it does not hold is skipped.
        rows: trials.parquet rows (of an earlier run, or of this one when it is extended).
        objectives: this run's objectives, in the study's order.
        sampler: the study's sampler.

    Returns:
        How many trials were added, and how many rows were skipped and why.
    """
    generation_key = getattr(sampler, "_get_generation_key", None)  # optuna's BaseGASampler
    added = 0
    skipped = {"failed": 0, "outside this space": 0, "without this run's objectives": 0, "of other data": 0}
    trials = []
    for row in rows:
        status = Status(row["status"])
        if status is Status.FAILED:
            skipped["failed"] += 1
            continue
        if row.get("data.name") != space.data.name or row.get("data.img_size") != space.data.img_size:
            skipped["of other data"] += 1
            continue
        replay = _replay(space, row)
        if replay is None:
            skipped["outside this space"] += 1
            continue
        state = optuna.trial.TrialState[OPTUNA_STATE[status]]
        values = None
        if state is optuna.trial.TrialState.COMPLETE:
            if status is Status.COMPLETED and any(row.get(name) is None for name, _ in objectives):
                skipped["without this run's objectives"] += 1
                continue
            values = values_for_sampler(row, objectives)  # an infeasible row: exact costs, worst for the rest
        attrs = dict(replay.system_attrs)
        if generation_key is not None:
            attrs[generation_key()] = 0
        trials.append(
            optuna.trial.create_trial(
                params=replay.params,
                distributions=replay.distributions,
                values=values,
                state=state,
                system_attrs=attrs,
                user_attrs={"from_trial": row["trial_id"]},
            )
        )
        added += 1
    study.add_trials(trials)
    return WarmStart(added, skipped)


def _replay(space: SearchSpace, row: dict[str, Any]) -> optuna.trial.FixedTrial | None:
    """The row's config suggested through this space (params, distributions, constraints), or
    None when the space does not hold it."""
    params = {}
    for name in space.dims:
        if name == "student.head_dim":
            embed, heads = row.get("student.embed_dim"), row.get("student.num_heads")
            value = None if embed is None or not heads else embed // heads
        else:
            value = row.get(name)
        if value is None:
            return None
        params[name] = value.item() if hasattr(value, "item") else value
    trial = optuna.trial.FixedTrial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial only warns when a value is outside a distribution
        try:
            space.suggest(trial)
        except (Warning, ValueError, TypeError):
            return None
    return trial
