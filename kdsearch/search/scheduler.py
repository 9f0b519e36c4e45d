"""Pareto-aware early stopping as a Ray Tune scheduler: an adapter around the pure rule in
kdsearch.search.early_stopping."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from kdsearch.results.tables import RunPaths
from kdsearch.search.early_stopping import ParetoHalvingRule


class ParetoHalving(FIFOScheduler):
    """Stops a trial at a milestone when enough cheaper-or-equal trials are already more
    accurate at the same epoch (see kdsearch.search.early_stopping). Trials start in FIFO order."""

    def __init__(self, rule: ParetoHalvingRule, accuracy: str, costs: tuple[str, ...], run: RunPaths):
        super().__init__()
        self.rule, self.accuracy, self.costs = rule, accuracy, costs
        self._run = run
        self._seeded = False

    def _seed_from_file(self) -> None:
        """After a resume, milestones reached before the driver died still count as peers."""
        self._seeded = True
        for row in self._run.rows(RunPaths.EPOCHS):
            if row.get("epochs_total") and self.rule.is_milestone(row["epoch"], row["epochs_total"]):
                if all(row.get(c) is not None for c in self.costs):
                    self.rule.record(
                        row["trial_id"], row["epoch"], tuple(row[c] for c in self.costs), row[self.accuracy]
                    )

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self._seeded:
            self._seed_from_file()
        meta = trial.config["kdsearch"]
        if meta["infeasible"] or not result.get("epoch"):
            return TrialScheduler.CONTINUE
        stop = self.rule.on_result(
            trial.trial_id,
            result["epoch"],
            int(meta["spec"]["train.epochs"]),
            tuple(float(result[c]) for c in self.costs),
            float(result[self.accuracy]),
        )
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
