"""A run folder's life around a search: created (or checked, on resume), an earlier run's trials
read for `--from`, and the inputs every trial shares
(the data, the teacher's logits and its weights) loaded once by the driver.

A run directory holds the space as run (space.yaml), run.json, trials.parquet, epochs.parquet,
the Optuna study (study.db, SQLite: `optuna-dashboard sqlite:///study.db`), Ray Tune's
experiment state with each trial's latest checkpoints (tune/), and each completed or
early-stopped trial's weights (trials/ID/); the teacher-logit cache lives beside the runs
(STORAGE/cache).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdsearch import __version__
from kdsearch.errors import KdsearchError
from kdsearch.results.tables import RunPaths, write_json
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TeacherSource
from kdsearch.storage import Storage


def prepare_run(
    space_file: Path,
    space: SearchSpace,
    paths: RunPaths,
    resume: bool,
    trials: int | None,
    address: str | None,
    from_run: str | None = None,
) -> dict[str, Any]:
    """Create (or check, on resume) the run in its storage.

    Args:
        space_file: the space file the search was started with (stored as space.yaml).
        space: that file, parsed.
        paths: the run's folder.
        resume: continue the run there instead of creating one.
        trials: --trials, if given.
        address: the Ray cluster, recorded in run.json.
        from_run: the run whose trials the sampler starts from (--from), recorded in run.json.

    Returns:
        The run's run.json.

    Raises:
        KdsearchError: a run exists where a new one would go, none where one is resumed, or
            the resumed one cannot go on as asked.
    """
    text = Path(space_file).read_text()
    store = paths.store
    if resume:
        return _check_resumable(space_file, text, paths, trials, from_run)
    if store.exists(RunPaths.META):
        raise KdsearchError(
            f"--name: a run already exists at {paths.uri}; use --resume to continue it or another --name"
        )
    store.write_text(RunPaths.SPACE, text)
    meta = {
        "name": paths.name,
        "space_file": str(Path(space_file).resolve()),
        "space_name": space.name,
        "trials": trials or space.search.trials,
        "started": time.time(),
        "address": address,
        "kdsearch": __version__,
        "objectives": [list(o) for o in space.objectives],
        "hypervolume_reference": space.reference_point(),
        "tune": RunPaths.TUNE,  # the Ray Tune experiment now running (an extended run gets another)
        "from": from_run,  # the earlier run whose trials the sampler started from (--from)
    }
    write_json(store, RunPaths.META, meta)
    return meta


def _check_resumable(
    space_file: Path, text: str, paths: RunPaths, trials: int | None, from_run: str | None
) -> dict[str, Any]:
    store = paths.store
    if not store.exists(RunPaths.META):
        raise KdsearchError(f"--resume: {paths.uri} holds no run to resume; start it without --resume")
    if from_run:
        raise KdsearchError("--from: only a new run starts from another; --resume continues this one")
    meta = paths.meta()
    for table in (RunPaths.TRIALS, RunPaths.EPOCHS):  # a torn table: one line now, before Ray starts
        paths.rows(table)
    if store.exists(RunPaths.SPACE) and store.read_text(RunPaths.SPACE) != text:
        raise KdsearchError(
            f"--resume: {space_file} differs from the space the run started with ({store.uri_of(RunPaths.SPACE)})"
        )
    if trials is not None and trials < int(meta["trials"]):
        raise KdsearchError(
            f"--trials {trials}: the run was started for {meta['trials']} trials; --resume can only extend it"
        )
    return meta


def earlier_trials(location: str | os.PathLike) -> list[dict[str, Any]]:
    """The trials of the run `--from` names.

    Raises:
        KdsearchError: it is not a run, or has no recorded trials.
    """
    from kdsearch.results.tables import open_run

    rows = open_run(location).rows(RunPaths.TRIALS)
    if not rows:
        raise KdsearchError(f"--from {location}: the run has no recorded trials yet")
    return rows


def load_data_and_teacher(space: SearchSpace, cache: Storage, say: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """Load the data, and the teacher's logits (computed once by Ray tasks, or read from the
    cache under the storage root: per image, or per image and epoch with the view's seed when
    the augmentation is random) and its weights for the trials that run it live.

    All three go to the workers through Ray's object store: no worker loads the teacher's
    checkpoint or runs it for the cache.

    Args:
        space: the search's space (its data, teacher, recipes and resources).
        cache: the teacher-logit cache's folder (STORAGE/cache).
        say: where one-line progress goes.

    Returns:
        `(data, cached_logits, shipped_teacher)`: the logits are None where no trial reads
        them, the teacher's weights (`ShippedTeacher`) None where no trial runs it live.
    """
    from kdsearch.search.teacher_tasks import cached_teacher_logits, cached_teacher_views
    from kdsearch.train.data import load_data
    from kdsearch.train.logit_cache import cache_key
    from kdsearch.train.teacher import ShippedTeacher, load_teacher

    data = load_data(space)
    sources = space.teacher_sources()
    if sources == {TeacherSource.NONE}:
        return data, None, None
    teacher = load_teacher(space, train_if_missing=True, log=say, data=data)  # trains the built-in one if missing
    shipped = (
        ShippedTeacher.of(teacher, space, cache_key(space.teacher, data)) if TeacherSource.LIVE in sources else None
    )
    if TeacherSource.CACHED not in sources:
        return data, None, shipped
    build = cached_teacher_views if data.random_augment else cached_teacher_logits
    return data, build(space, data, teacher, cache, space.resources.gpus, say), shipped
