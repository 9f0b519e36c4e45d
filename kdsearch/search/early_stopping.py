"""Pareto-aware early stopping: a multi-objective successive halving, as a pure rule.

At milestone epochs (grace, grace * rf, grace * rf^2, ... below the trial's last epoch) every
trial's accuracy and costs are recorded. A trial is stopped at a milestone when at least
`beaten_by` other trials, recorded at the same milestone, cost no more in every cost
objective (FLOPs, ...) and already have a strictly higher accuracy. A tiny student is
never stopped for being less accurate than a large one: only cheaper-or-equal peers count.
The Ray Tune scheduler in `kdsearch.search.scheduler` is a thin adapter around `ParetoHalvingRule`;
the space file declares its settings (`EarlyStopping`, in kdsearch.space.search_space).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdsearch.space.search_space import EarlyStopping


@dataclass
class ParetoHalvingRule:
    config: EarlyStopping
    # milestone epoch -> trial id -> (costs, accuracy)
    records: dict[int, dict[str, tuple[tuple[float, ...], float]]] = field(default_factory=dict)

    def is_milestone(self, epoch: int, epochs_total: int) -> bool:
        if not self.config.enabled or epoch >= epochs_total or epoch < self.config.grace_epochs:
            return False
        m = self.config.grace_epochs
        while m < epoch:
            m *= max(2, self.config.reduction_factor)
        return m == epoch

    def record(self, trial_id: str, epoch: int, costs: tuple[float, ...], accuracy: float) -> None:
        self.records.setdefault(epoch, {})[trial_id] = (tuple(costs), float(accuracy))

    def beaten_by(self, trial_id: str, epoch: int) -> list[str]:
        """Trials at this milestone that cost no more in every objective and are more accurate."""
        rec = self.records.get(epoch, {})
        costs, acc = rec[trial_id]
        return [
            other
            for other, (c, a) in rec.items()
            if other != trial_id and a > acc and all(ci <= mi for ci, mi in zip(c, costs))
        ]

    def on_result(
        self, trial_id: str, epoch: int, epochs_total: int, costs: tuple[float, ...], accuracy: float
    ) -> bool:
        """Record a result; True when the trial should stop now."""
        if not self.is_milestone(epoch, epochs_total):
            return False
        self.record(trial_id, epoch, costs, accuracy)
        return len(self.beaten_by(trial_id, epoch)) >= self.config.beaten_by
