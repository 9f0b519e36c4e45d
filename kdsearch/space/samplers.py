"""The Optuna samplers a space can name (`search.sampler`): one table of constructors.

The space accepts exactly the names of this table, so a sampler the space allows always has
a constructor (a name without one cannot exist). Optuna is imported only when a sampler is
made, in the search's driver.
"""

from __future__ import annotations

import copyreg
import functools
import threading
from collections.abc import Callable
from typing import Any

# What a suggestion costs as a run grows (benchmarks/sampler_scale.py: one ask and tell in kdsearch's
# digits space, median; benchmarks/README.md has the machine and the full table):
#   nsga2   6-15 ms at 1,000 completed trials, 16-36 ms at 10,000: about flat (one generation at a time)
#   tpe     74 ms at 1,000, 463 ms at 10,000: linear in the trials (its Parzen estimators span them all);
#           n_ei_candidates 8 instead of 24 and constant_liar off change neither figure at 10,000;
#           univariate (one estimator per parameter) is 4-8x slower than multivariate
# So nsga2 is the default for long runs, and TPE keeps its fastest form.
TPE_SLOW_AFTER = 2000  # trials after which the search says that TPE's suggestions grow slow

Fixed = dict[str, Any] | None  # name -> optuna distribution that every trial suggests, where known


def _nsga2(settings: Any, fixed: Fixed) -> Any:
    import optuna

    # NSGA-II is random until its first generation is full: size it to the budget of trials
    population = settings.population_size or max(4, min(50, settings.trials // 3))
    return picklable(_made(optuna.samplers.NSGAIISampler, fixed, population_size=population, seed=settings.seed))


def _tpe(settings: Any, fixed: Fixed) -> Any:
    import optuna

    # multivariate: one joint estimator (the fastest form, above); constant liar: running trials
    # count as bad, so concurrent trials spread out; 24 candidates (Optuna's default: fewer saves nothing)
    return _made(
        optuna.samplers.TPESampler, fixed, seed=settings.seed, multivariate=True, constant_liar=True, n_ei_candidates=24
    )


def _gp(settings: Any, fixed: Fixed) -> Any:
    import optuna

    return _made(optuna.samplers.GPSampler, fixed, seed=settings.seed)


def _random(settings: Any, fixed: Fixed) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=settings.seed)  # no joint space: `fixed` changes nothing


SAMPLERS: dict[str, Callable[[Any, Fixed], Any]] = {"nsga2": _nsga2, "tpe": _tpe, "gp": _gp, "random": _random}
"""name -> constructor taking the space's `search` settings (trials, population_size, seed) and the
distributions every trial suggests, where they are known (`make_sampler`)."""


_LOCK = type(threading.Lock())


def picklable(sampler: Any) -> Any:
    """`sampler`, made to pickle when it holds a lock. Optuna 5.1's genetic samplers (NSGA-II's
    generation cache) hold a `threading.Lock`, which does not pickle, and Ray pickles the
    searcher with its sampler when the Tuner starts and whenever it saves the search: on Optuna
    5.1 a plain Ray Tune + OptunaSearch with NSGA-II fails before its first trial. This
    registers (with copyreg, which pickle, Ray's cloudpickle and deepcopy all consult) a
    reduction for the sampler's class that leaves the lock out and gives the copy a new one."""
    if isinstance(getattr(sampler, "_thread_lock", None), _LOCK):
        copyreg.pickle(type(sampler), _without_lock)
    return sampler


def _without_lock(sampler: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    state = {k: v for k, v in vars(sampler).items() if k != "_thread_lock"}
    return _with_new_lock, (type(sampler), state)


def _with_new_lock(cls: type, state: dict[str, Any]) -> Any:
    sampler = cls.__new__(cls)
    vars(sampler).update(state, _thread_lock=threading.Lock())
    return sampler


def make_sampler(settings: Any, distributions: Fixed = None) -> Any:
    """The optuna sampler `settings.sampler` names, seeded with `settings.seed`.

    Args:
        settings: the space's `search` settings (or a copy naming another sampler).
        distributions: name -> optuna distribution that every trial of the study suggests, where
            that is known (the screening's students): the sampler takes them as its joint search
            space instead of computing it on each ask (`_on_fixed_space`). Such a sampler serves
            a study in one process: its class is made at run time and does not pickle.
    """
    return SAMPLERS[settings.sampler](settings, distributions)


def _made(cls: type, fixed: Fixed, **kwargs: Any) -> Any:
    if fixed is None:
        return cls(**kwargs)
    sampler = _on_fixed_space(cls)(**kwargs)
    sampler.fixed_space = {name: d for name, d in sorted(fixed.items()) if not d.single()}
    return sampler


@functools.cache
def _on_fixed_space(cls: type) -> type:
    """`cls` with a joint search space given, not computed. Optuna's NSGA-II, multivariate TPE
    and GP samplers compute it on every ask as the intersection of the distributions of the
    study's trials, scanning each trial from the oldest one still running. A screening keeps
    hundreds of asked trials running while their students are scored, so every ask scanned them
    all again: 7 ms an ask at 1,000 students, most of the driver's time. NOTE: when every trial
    suggests the same distributions, that intersection is those distributions less the
    single-valued ones, sorted by name (`_made` stores exactly that), so the sampler proposes the
    same students from the same seed."""

    def infer_relative_search_space(self: Any, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self.fixed_space)

    return type(f"{cls.__name__}OnFixedSpace", (cls,), {"infer_relative_search_space": infer_relative_search_space})
