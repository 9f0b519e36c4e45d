"""The Optuna samplers a space can name (`search.sampler`): one table of constructors.

The space accepts exactly the names of this table, so a sampler the space allows always has
a constructor (a name without one cannot exist). Optuna is imported only when a sampler is
made, in the search's driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _nsga2(settings: Any) -> Any:
    import optuna

    # NSGA-II is random until its first generation is full: size it to the budget of trials
    population = settings.population_size or max(4, min(50, settings.trials // 3))
    return optuna.samplers.NSGAIISampler(population_size=population, seed=settings.seed)


def _tpe(settings: Any) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)


def _gp(settings: Any) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=settings.seed)


def _random(settings: Any) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=settings.seed)


SAMPLERS: dict[str, Callable[[Any], Any]] = {"nsga2": _nsga2, "tpe": _tpe, "gp": _gp, "random": _random}
"""name -> constructor taking the space's `search` settings (trials, population_size, seed)."""


def make_sampler(settings: Any) -> Any:
    """The optuna sampler `settings.sampler` names, seeded with `settings.seed`."""
    return SAMPLERS[settings.sampler](settings)
