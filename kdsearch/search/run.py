"""The distributed search: Ray Tune runs the trials, Optuna (multi-objective) chooses them.

`run_search` is the entry point. The parts are adapters around plain pieces:

    SearchSpace.suggest   -> DefineByRun, the space of Ray's OptunaSearch (budgets as constraints)  searcher.py
    run_trial             -> the function trainable (reports through ray.tune.report)             here
    ParetoHalvingRule     -> ParetoHalving, a Ray Tune TrialScheduler                              scheduler.py
    results tables        -> ResultsRecorder, a Ray Tune Callback writing Parquet atomically       callbacks.py
    status rendering      -> LiveView, a Ray Tune Callback drawing a rich live view                callbacks.py

A run directory holds the space as run (space.yaml), run.json, trials.parquet, epochs.parquet,
the Optuna study (study.db, SQLite: `optuna-dashboard sqlite:///study.db`), Ray Tune's
experiment state (tune/), the teacher-logit cache (cache/) and each trial's weights (trials/ID/).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from kdsearch import __version__
from kdsearch.atomic import write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import RunPaths, read_rows, write_json
from kdsearch.search.callbacks import LiveView, ResultsRecorder
from kdsearch.search.early_stopping import ParetoHalvingRule
from kdsearch.search.scheduler import ParetoHalving
from kdsearch.search.searcher import DefineByRun, KdsearchOptunaSearch
from kdsearch.space import objectives as objective_table
from kdsearch.space.file import load_space
from kdsearch.space.objectives import Pairs, accuracy_and_cost, values_for_sampler
from kdsearch.space.samplers import make_sampler
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TeacherSource, TrialSpec


@dataclass
class SearchResult:
    paths: RunPaths
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    interrupted: bool
    grid: Any = None  # Ray Tune's ResultGrid


def _trainable(
    config: dict[str, Any],
    run_dir: str,
    data: Any,
    cached_logits: Any,
    threads: int,
    objectives: Pairs,
    measured: tuple,
) -> None:
    """One Ray Tune trial: an infeasible config reports at once (its exact costs, and the
    worst value of what it never measured); the rest run `run_trial`.

    `data`, `cached_logits` and the run's measured objectives (their definitions) are the
    driver's, through the object store (tune.with_parameters): a measured objective a user
    registered in the driver needs no registration in the worker.
    """
    import torch

    from kdsearch.train.trial import run_trial

    torch.set_num_threads(threads)
    meta = config["kdsearch"]
    spec = TrialSpec.from_dict(meta["spec"])
    if meta["infeasible"]:
        # over the budget: never trains; Optuna already holds its constraint values
        computed = objective_table.computed(spec.student)
        never_trained = dict(zip([name for name, _ in objectives], values_for_sampler(computed, objectives)))
        tune.report({"epoch": 0, **computed, **never_trained})
        return
    trial_id = tune.get_context().get_trial_id()
    run_trial(
        spec,
        tune.report,
        RunPaths(Path(run_dir)).trial_dir(trial_id),
        data=data,
        cached_logits=cached_logits,
        objectives=measured,
        loader_workers=max(0, threads - 1),  # the trial's other CPUs decode images (unused for in-memory digits)
    )


def _init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; LiveView shows progress
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KdsearchError(
                f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0][:200]}"
            ) from None
    else:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


def _prepare_run(
    space_file: Path, space: SearchSpace, paths: RunPaths, resume: bool, trials: int, address: str | None
) -> float:
    """Create (or check, on resume) the run directory; returns the run's start time."""
    text = Path(space_file).read_text()
    if resume:
        if not paths.meta.exists():
            raise KdsearchError(f"--resume: {paths.root} holds no run to resume; start it without --resume")
        meta = json.loads(paths.meta.read_text())
        if paths.space.exists() and paths.space.read_text() != text:
            raise KdsearchError(f"--resume: {space_file} differs from the space the run started with ({paths.space})")
        return float(meta["started"])
    if paths.meta.exists():
        raise KdsearchError(
            f"--name: a run already exists at {paths.root}; use --resume to continue it or another --name"
        )
    write_text_atomic(paths.space, text)
    started = time.time()
    write_json(
        paths.meta,
        {
            "name": paths.root.name,
            "space_file": str(Path(space_file).resolve()),
            "space_name": space.name,
            "trials": trials,
            "started": started,
            "address": address,
            "kdsearch": __version__,
            "objectives": [list(o) for o in space.objectives],
        },
    )
    return started


def _load_once(space: SearchSpace, paths: RunPaths, say: Callable[[str], None]):
    """Load the data and compute (or read) the teacher's logits once for the whole search.

    Both go to the workers through Ray's object store, so no worker loads the data or runs
    the teacher for the cache. The logits are None where unused or where augmentation is random.
    """
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import teacher_logits
    from kdsearch.train.teacher import load_teacher

    data = load_data(space)
    sources = space.teacher_sources(data.random_augment)
    if sources == {TeacherSource.NONE}:
        return data, None
    teacher = load_teacher(space, train_if_missing=True, log=say, data=data)  # trains the built-in one if missing
    if TeacherSource.CACHED not in sources:
        if TeacherSource.CACHED in space.teacher_sources(random_augment=False):
            say("training augmentation is random: trials run the teacher live (the logit cache is off)")
        return data, None
    t0 = time.perf_counter()
    logits, images = teacher_logits(teacher, data, space.teacher, paths.cache)
    if images:
        say(f"teacher logits cached once for the search: {images:,} images in {time.perf_counter() - t0:.1f} s")
    return data, logits


def run_search(
    space_file: str | os.PathLike,
    *,
    trials: int | None = None,
    address: str | None = None,
    name: str | None = None,
    storage: str | os.PathLike | None = None,
    resume: bool = False,
    console: Any = None,
    say: Callable[[str], None] = print,
    reuse_actors: bool = True,
) -> SearchResult:
    """Run (or resume) a search; returns the trials table and the front.

    `console` (a rich Console) gets a live view of the search; `say` its one-line messages.
    `reuse_actors=False` is Ray's default, kept as a baseline for benchmarks: every trial
    then pays a fresh worker's imports and data loading.
    """
    space_file = Path(space_file)
    space = load_space(space_file)
    storage_str = str(storage or "runs")
    if "://" in storage_str:
        raise KdsearchError(
            f"--storage {storage_str}: kdsearch writes its tables to a local or shared filesystem path; mount the bucket and give its path"
        )
    paths = RunPaths((Path(storage_str) / (name or space.name)).resolve())
    total = trials or space.search.trials
    started = _prepare_run(space_file, space, paths, resume, total, address)

    owns_ray = not ray.is_initialized()
    _init_ray(address)
    try:
        return _search(space, paths, total, started, resume, console, say, reuse_actors)
    finally:
        if owns_ray:
            ray.shutdown()


def _search(
    space: SearchSpace,
    paths: RunPaths,
    total: int,
    started: float,
    resume: bool,
    console: Any,
    say: Callable[[str], None],
    reuse_actors: bool,
) -> SearchResult:
    data, cached = _load_once(space, paths, say)

    acc, _ = accuracy_and_cost(space.objectives)
    costs = tuple(name for name, mode in space.objectives if mode == "min")
    searcher = KdsearchOptunaSearch(
        space=DefineByRun(space),
        metric=[name for name, _ in space.objectives],
        mode=[mode for _, mode in space.objectives],
        sampler=make_sampler(space.search),
        study_path=str(paths.study),
        trials_path=str(paths.trials),
        total=total,
    )
    scheduler = ParetoHalving(ParetoHalvingRule(space.early_stopping), acc, costs, str(paths.epochs))
    recorder = ResultsRecorder(paths, searcher)
    callbacks: list[tune.Callback] = [recorder]
    if console is not None:
        callbacks.append(LiveView(recorder, space, total, started, console))

    measured = tuple(
        objective_table.get(name) for name, _ in space.objectives if objective_table.get(name).source == "measured"
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable,
            run_dir=str(paths.root),
            data=data,
            cached_logits=cached,
            threads=max(1, int(space.resources.cpus)),
            objectives=space.objectives,
            measured=measured,
        ),
        {"cpu": space.resources.cpus, "gpu": space.resources.gpus},
    )
    if resume and tune.Tuner.can_restore(str(paths.tune)):
        tuner = tune.Tuner.restore(str(paths.tune), trainable=trainable, resume_unfinished=True, resume_errored=False)
        say(f"resuming {paths.root}")
    elif resume:
        raise KdsearchError(
            f"--resume: {paths.tune} holds no Ray Tune state (the search died before its first checkpoint); start it again"
        )
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=total,
                max_concurrent_trials=space.search.max_concurrent,
                reuse_actors=reuse_actors,  # warm workers: imports, data and teacher load once each
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(paths.root),
                failure_config=tune.FailureConfig(max_failures=space.search.max_failures),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    grid = tuner.fit()  # SIGINT makes fit() return what finished, without raising
    rows = read_rows(paths.trials)
    return SearchResult(paths, rows, front_rows(rows, space.objectives), interrupted=len(rows) < total, grid=grid)
