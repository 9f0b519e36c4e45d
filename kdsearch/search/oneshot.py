"""`search.strategy: oneshot`: a weight-sharing supernet screens the students, and only the
screened ones train.

    1. supernet   one Ray task (a trial's GPUs, at least a whole one, when trials use any, else a
                  trial's CPUs; data-parallel on N >= 2 GPUs as a trial) trains
                  kdsearch.train.supernet_training's supernet with the run's data and cached
                  teacher logits; its state is written whole to oneshot/supernet.pt after each
                  epoch, and each epoch's report streams back to the driver (its line, a row of
                  oneshot/supernet_epochs.parquet)
    2. screening  an Optuna study in the driver asks students, Ray tasks score them with
                  inherited weights (kdsearch.search.screening) -> oneshot/screening.parquet,
                  whose `kept` rows are the students stage 3 trains, in that order
    3. training   the run's own search (kdsearch.search.run) with the kept students enqueued
                  (their student dimensions only: the sampler chooses the recipe and training)

oneshot/stages.json says where the run is: each stage's start, end (null while it runs), and
progress. Each stage resumes where the last driver left it: a supernet from its last epoch
(a finished one is not trained again), a screening from its recorded rows, the training from
its recorded trials with the kept students not yet trained enqueued again.
"""

from __future__ import annotations

import io
import json
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
import ray

from kdsearch.results.oneshot import STAGES, SUPERNET_EPOCHS
from kdsearch.results.parts import to_parquet
from kdsearch.results.tables import RunPaths, write_json
from kdsearch.search.screening import (
    STALL_ASKS,
    SUPERNET,
    Screening,
    read_screening,
    student_key,
    student_params,
    task_result,
)
from kdsearch.search.teacher_tasks import placed
from kdsearch.search.worker_data import shipped, worker_data
from kdsearch.space.search_space import SearchSpace
from kdsearch.storage import Storage

Row = dict[str, Any]


class Stages:
    """oneshot/stages.json: read once, written whole at each change."""

    def __init__(self, store: Storage):
        self.store = store
        self.state: dict[str, dict[str, Any]] = json.loads(store.read_text(STAGES)) if store.exists(STAGES) else {}

    def get(self, stage: str) -> dict[str, Any]:
        return dict(self.state.get(stage, {}))

    def update(self, stage: str, **fields: Any) -> None:
        self.state.setdefault(stage, {}).update(fields)
        write_json(self.store, STAGES, self.state)


def supernet_epochs(space: SearchSpace) -> int:
    """The supernet's epochs: `search.supernet_epochs`, else the space's `train.epochs` default."""
    return space.search.supernet_epochs or int(space.dims["train.epochs"].default)


def run_oneshot(
    space: SearchSpace, paths: RunPaths, loaded: tuple[Any, Any, Any], trials: int, say: Callable[[str], None]
) -> list[Row]:
    """Stages 1 and 2, each resumed where it stopped (a finished one is skipped).

    Args:
        space: the run's space (`search.strategy: oneshot`).
        paths: the run.
        loaded: `(data, cached_logits, shipped_teacher)` (kdsearch.search.run_folder.load_data_and_teacher).
        trials: the students stage 3 trains (the run's total): how many the screening keeps.
        say: where the one-line progress goes.

    Returns:
        The kept screening rows, in the order stage 3 trains them.
    """
    stages = Stages(paths.store)
    data, cached_logits, _ = loaded
    epoch = _supernet_stage(space, paths.store, data, cached_logits, stages, say)
    return _screening_stage(space, paths.store, data, epoch, stages, trials, say)


@ray.remote
def _train_supernet(
    space: SearchSpace, store: Storage, travelled: Any, cached_logits: Any, epochs: int, world_size: int
) -> Iterator[Any]:
    """The supernet's training as a Ray generator task: where it runs and the epoch it starts
    after (0: from scratch), then each epoch's report as it comes (the training runs in a
    thread, which saves its state)."""
    import torch

    from kdsearch.train.setup import TrialSetup
    from kdsearch.train.supernet_training import train_supernet
    from kdsearch.train.trial import trial_device

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = trial_device(gpu_ids)
    state = None
    if store.exists(SUPERNET):  # a resumed run: the last epoch saved
        state = torch.load(io.BytesIO(store.read_bytes(SUPERNET)), map_location="cpu", weights_only=True)
    yield placed([(ray.get_runtime_context().get_node_id(), ",".join(gpu_ids))]), int(state["epoch"]) if state else 0
    if state is not None and int(state["epoch"]) >= epochs:
        return
    items: queue.Queue = queue.Queue()

    def save(saved: dict) -> None:
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        store.write_bytes(SUPERNET, buffer.getvalue())  # whole or nothing: a kill leaves the last epoch's

    def work() -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="kdsearch-supernet-") as workdir:
                setup = TrialSetup(
                    workdir=workdir,
                    data=worker_data(travelled),
                    cached_logits=cached_logits,
                    device=device,
                    world_size=world_size,  # N >= 2 GPUs: one process each, as a trial (kdsearch.train.parallel)
                )
                train_supernet(space, setup, epochs, items.put, state=state, save=save, threads=threads)
            items.put(None)
        except BaseException as e:  # re-raised in the task, whose error the driver gets
            items.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := items.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield dict(item)


def _supernet_stage(
    space: SearchSpace, store: Storage, data: Any, cached_logits: Any, stages: Stages, say: Callable[[str], None]
) -> int:
    """Stage 1: train the supernet (or continue it); returns its epochs."""
    epochs = supernet_epochs(space)
    done = stages.get("supernet")
    if done.get("ended") is not None:
        say(f"supernet: trained before ({done['epochs']} epochs), {store.uri_of(SUPERNET)}")
        return int(done["epochs"])
    t0 = time.time()
    stages.update("supernet", started=done.get("started", t0), ended=None, epochs=done.get("epochs", 0), of=epochs)
    rows = {int(r["epoch"]): r for r in _epoch_rows(store)}
    gpus = space.resources.gpus
    world = int(gpus) if gpus >= 2 else 1  # as a trial of the space trains: data-parallel on N >= 2 GPUs
    # on CPUs the supernet trains alone in its stage: every CPU of the largest node, one torch thread each
    cpus = world if gpus > 0 else max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    task = _train_supernet.options(num_cpus=cpus, num_gpus=world if gpus > 0 else 0)
    where = ""
    for ref in task.remote(space, store, shipped(data), cached_logits, epochs, world):
        item = task_result(ref)
        if isinstance(item, tuple):  # where it runs, and the epoch its saved state had reached
            where, start = item
            rows = {k: r for k, r in rows.items() if k <= start}  # an epoch after the saved state trains again
            after = f"after epoch {start}" if start else "from scratch"
            say(f"supernet: {epochs} epochs, {after}, training as a Ray task on {where}")
            continue
        rows[int(item["epoch"])] = item
        store.write_bytes(SUPERNET_EPOCHS, to_parquet([rows[k] for k in sorted(rows)], ["epoch"]))
        stages.update("supernet", epochs=int(item["epoch"]))
        say(_epoch_line(item, epochs))
    stages.update("supernet", ended=time.time(), epochs=epochs)
    say(f"supernet: trained {epochs} epochs in {time.time() - t0:.1f} s on {where}")
    return epochs


def _epoch_rows(store: Storage) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not store.exists(SUPERNET_EPOCHS):
        return []
    return pq.read_table(pa.BufferReader(store.read_bytes(SUPERNET_EPOCHS))).to_pylist()


def _epoch_line(report: Row, epochs: int) -> str:
    shown = ", ".join(
        f"{k} {report[k]:.4g}"
        for k in ("loss", "largest_val_acc", "smallest_val_acc", "images_per_s", "seconds")
        if isinstance(report.get(k), (int, float))
    )
    return f"supernet: epoch {report['epoch']}/{epochs}: {shown}"


def _screening_stage(
    space: SearchSpace,
    store: Storage,
    data: Any,
    epoch: int,
    stages: Stages,
    trials: int,
    say: Callable[[str], None],
) -> list[Row]:
    """Stage 2: score students with inherited weights (or continue), then keep `trials` of them."""
    target = space.search.screen_subnets
    done = stages.get("screening")
    if done.get("ended") is not None:
        kept = sorted((r for r in read_screening(store) if r["kept"] >= 0), key=lambda r: r["kept"])
        say(f"screening: done before ({done['scored']:,} students scored), {len(kept)} kept")
        return kept
    t0 = time.time()
    stages.update("screening", started=done.get("started", t0), ended=None, scored=done.get("scored", 0), of=target)
    screening = Screening(space, store, epoch, float(stages.get("screening")["started"]))
    before = screening.scored
    tasks = screening.run(shipped(data), space.resources.gpus, lambda n: stages.update("screening", scored=n))
    kept = screening.finish(trials)
    stages.update("screening", ended=time.time(), scored=screening.scored)
    took = time.time() - t0
    new = screening.scored - before
    say(
        f"screening: {new:,} students scored with inherited weights by {tasks} Ray task(s) in {took:.1f} s "
        f"({new / max(took, 1e-9):,.0f}/s{', on ' + placed(screening.places) if screening.places else ''}); "
        f"{screening.scored:,} in all, {len(kept)} kept for training (the screened front first)"
    )
    if screening.stalled:
        say(
            f"screening: stopped at {screening.scored:,} of {target:,}: the sampler proposed only students "
            f"it had seen, {STALL_ASKS} times in a row"
        )
    if len(kept) < trials:
        say(
            f"screening: only {len(kept)} feasible students to keep; the sampler chooses the other {trials - len(kept)}"
        )
    return kept


def enqueue_kept(study: optuna.Study, space: SearchSpace, kept: Sequence[Row], recorded: Sequence[Row]) -> int:
    """Enqueue the kept students (their student dimensions only) that no recorded trial trained.

    Args:
        study: the searcher's study.
        space: the run's space.
        kept: the kept screening rows, in the order they train (`run_oneshot`).
        recorded: the run's trials.parquet rows (a resumed run's; [] for a new one).

    Returns:
        How many were enqueued.
    """
    trained = {student_key(row) for row in recorded}
    queued = 0
    for row in kept:
        if student_key(row) not in trained:
            study.enqueue_trial(student_params(space, row))
            queued += 1
    return queued
