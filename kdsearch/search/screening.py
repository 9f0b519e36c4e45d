"""Stage 2 of `search.strategy: oneshot`: the screening of students with the supernet's
inherited weights, and the choice of the students stage 3 trains.

An Optuna study in the driver (the space's `search.screen_sampler`, multi-objective in the
run's objectives, the budget's constraints as `SearchSpace.suggest` sets them) asks subnets:
the student dimensions only, in batches. Each distinct feasible student is scored once, by
a Ray task that loads the supernet once per worker process (kdsearch.train.supernet_training
`score_subnets`: val accuracy with inherited weights, no training); its cost objectives are
computed from the spec. A student over the budget is recorded unscored and told to the study
at the worst accuracy; one proposed again is told its recorded values without a new row.

oneshot/screening.parquet holds one row per distinct student, written by parts as batches
return (kdsearch.results.parts; a later row of a subnet_id replaces the earlier one), so a
resumed driver adds the recorded rows to a new study and scores only what is missing. When
`search.screen_subnets` students are scored, the rows are ranked (non-dominated sorting among
the feasible scored rows: rank 1 is the screened front) and the kept ones marked with the order
stage 3 trains them in (`kept_order`); the table is then one whole file.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
import ray
from ray.exceptions import RayTaskError

from kdsearch.errors import KdsearchError
from kdsearch.results.oneshot import SCREENING, SUPERNET, latest_subnets
from kdsearch.results.pareto import non_dominated_mask
from kdsearch.results.parts import PartsWriter, read_table_rows
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import values_for_sampler
from kdsearch.space.samplers import make_sampler
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import StudentSpec
from kdsearch.storage import Storage

MAX_BATCH = 256  # students per scoring task at most: a task's result returns as one object
# asks in a row that propose no student not yet seen: the sampler has settled (each ask costs more as the
# study grows, so a sampler circling a few students in a small space is stopped, not asked on and on)
STALL_ASKS = 200

Row = dict[str, Any]


def student_key(row: Row) -> tuple[tuple[str, Any], ...]:
    """A student's identity: its `student.*` columns (a screening row, a trials.parquet row, a
    flat TrialSpec), sorted by name."""
    return tuple(sorted((k, v) for k, v in row.items() if k.startswith("student.")))


def student_params(space: SearchSpace, row: Row) -> dict[str, Any]:
    """The values of the space's student dimensions that make the student of `row` (its
    `student.*` columns): what stage 3 enqueues (`head_dim` from embed_dim and num_heads)."""
    out = {}
    for name in space.student_dims():
        if name == "student.head_dim":
            out[name] = int(row["student.embed_dim"]) // int(row["student.num_heads"])
        else:
            out[name] = row[name]
    return out


def read_screening(store: Storage) -> list[Row]:
    """The screening rows recorded so far (the whole table and its parts), by subnet_id."""
    return read_table_rows(store, SCREENING, latest_subnets)


def task_result(ref: Any) -> Any:
    """`ray.get(ref)`, where a user error the task raised (data missing on its node) is raised
    as its one line, not as Ray's traceback."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(getattr(e, "cause", None), KdsearchError):
            raise KdsearchError(str(e.cause)) from None
        raise


def _one_per_process(cache: dict[str, Any], key: tuple[str, int], load: Callable[[], Any]) -> Any:
    if cache.get("key") != key:
        cache.clear()
        cache.update(key=key, value=load())
    return cache["value"]


_SUPERNET: dict[str, Any] = {}  # this worker process's supernet: {"key": (its file's URI, epoch), "value": it}


@ray.remote(max_calls=0)  # workers are kept (GPU tasks' default is 1 call each): the supernet loads once per process
def _score_batch(
    space: SearchSpace, store: Storage, epoch: int, travelled: Any, students: list[StudentSpec]
) -> tuple[tuple[str, str], list[float]]:
    import io

    import torch

    from kdsearch.search.worker_data import worker_data
    from kdsearch.train.supernet_training import load_supernet, score_subnets
    from kdsearch.train.trial import trial_device

    torch.set_num_threads(1)
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = trial_device(gpu_ids)

    def load() -> Any:
        state = torch.load(io.BytesIO(store.read_bytes(SUPERNET)), map_location="cpu", weights_only=True)
        return load_supernet(space, state).to(device).eval()

    supernet = _one_per_process(_SUPERNET, (store.uri_of(SUPERNET), epoch), load)
    scores = score_subnets(supernet, students, worker_data(travelled), device=device)
    where = (ray.get_runtime_context().get_node_id(), ",".join(gpu_ids))
    return where, [float(s) for s in scores]


class Screening:
    """One run's screening: its study, its rows, the batches in flight.

    Args:
        space: the run's space.
        store: the run's storage.
        epoch: the supernet's epoch (its file is oneshot/supernet.pt; workers cache it by both).
        started: when the screening first started (time.time()): `scored_at` counts from it.
    """

    def __init__(self, space: SearchSpace, store: Storage, epoch: int, started: float):
        self.space, self.store, self.epoch, self.started = space, store, epoch, started
        self.students = dataclasses.replace(space, dims=space.student_dims())  # suggests the students only
        self.costs = [name for name, _ in space.objectives if name != "val_acc"]
        self.rows = read_screening(store)
        self.known = {student_key(r): r for r in self.rows}
        self.next_id = max((int(r["subnet_id"]) for r in self.rows), default=-1) + 1
        self.pending: dict[tuple, tuple[Row, optuna.trial.Trial]] = {}  # in flight: key -> row, its trial
        self.rng = np.random.default_rng([space.search.seed or 0, len(self.rows)])  # the unseen students drawn
        first = ["subnet_id", "inherited_val_acc", *self.costs, "feasible", "rank", "kept", "scored_at"]
        self.writer = PartsWriter(store, SCREENING, first, latest_subnets)
        self.study = self._study()
        self.places: list[tuple[str, str]] = []
        self.scored = sum(1 for r in self.rows if r["inherited_val_acc"] is not None)  # students scored so far
        self.unwritten: list[Row] = []  # rows over the budget since the last part: written with the next batch
        self.stalled = False  # the sampler proposed only students it had seen, STALL_ASKS times in a row

    def _study(self) -> optuna.Study:
        """A new study with every recorded row told as a finished trial (a resumed screening)."""
        settings = dataclasses.replace(
            self.space.search,
            sampler=self.space.search.screen_sampler,
            trials=self.space.search.screen_subnets,
            population_size=None,
        )
        sampler = make_sampler(settings, self._distributions())
        directions = ["maximize" if mode == "max" else "minimize" for _, mode in self.space.objectives]
        study = optuna.create_study(sampler=sampler, directions=directions)
        generation_key = getattr(sampler, "_get_generation_key", None)  # optuna's BaseGASampler
        trials = []
        for row in self.rows:
            fixed = optuna.trial.FixedTrial(student_params(self.space, row))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.students.suggest(fixed)
            attrs = dict(fixed.system_attrs)
            if generation_key is not None:
                attrs[generation_key()] = 0
            trials.append(
                optuna.trial.create_trial(
                    params=fixed.params, distributions=fixed.distributions, values=self._values(row), system_attrs=attrs
                )
            )
        study.add_trials(trials)
        return study

    def _distributions(self) -> dict[str, Any]:
        """What every trial of the screening suggests: the student dimensions' distributions."""
        fixed = optuna.trial.FixedTrial({name: dim.default for name, dim in self.students.dims.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.students.suggest(fixed)
        return dict(fixed.distributions)

    def _values(self, row: Row) -> list[float]:
        """What the study is told of a row: the inherited accuracy as val_acc, the exact costs."""
        return values_for_sampler({**row, "val_acc": row["inherited_val_acc"]}, self.space.objectives)

    def _row(self, student: StudentSpec) -> Row:
        row: Row = {"subnet_id": self.next_id, "inherited_val_acc": None}
        row.update({f"student.{k}": v for k, v in dataclasses.asdict(student).items()})
        row.update({name: float(objective_table.get(name).compute(student)) for name in self.costs})
        row.update(feasible=self.space.budget.feasible(student), rank=0, kept=-1, scored_at=None)
        return row

    def ask(self, size: int, target: int, limit: float) -> list[Row]:
        """Up to `size` new feasible students to score, asked of the study; new infeasible ones
        are recorded unscored. A proposal of a student already recorded or in flight fails, and
        a random student not yet seen is asked next in its place (`_enqueue_unseen`). Stops at
        `target` scored or in flight, or when the space has no student left."""
        batch: list[Row] = []
        stall = 0
        while (
            len(batch) < size and self.scored + len(self.pending) < target and stall < STALL_ASKS and not self.stalled
        ):
            if len(self.known) + len(self.pending) >= limit:
                break
            trial = self.study.ask()
            row = self._row(self.students.suggest(trial).student)
            key = student_key(row)
            if key in self.known or key in self.pending:
                # NOTE: a failed trial belongs to no generation, so copies of a student never crowd
                # a genetic sampler's population; the student's values are in the study already
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self._enqueue_unseen()
                stall += 1
                continue
            self.next_id += 1  # the row is new: its id is taken
            stall = 0
            if not row["feasible"]:  # over the budget: recorded, never scored
                row["scored_at"] = time.time() - self.started
                self._record([row], write=False)
                self.study.tell(trial, self._values(row))
            else:
                self.pending[key] = (row, trial)
                batch.append(row)
        self.stalled = self.stalled or stall >= STALL_ASKS
        return batch

    def _enqueue_unseen(self, draws: int = 100) -> None:
        """Enqueue a random student neither recorded nor in flight (a feasible one where `draws`
        random students hold one), so the sampler's next ask proposes something new. A sampler
        that has settled in a small space proposes copies of its elite ever more often; each copy
        was a trial that every later ask scanned again."""
        unseen = None
        for _ in range(draws):
            student = self.students.sample(self.rng).student
            row = self._row(student)
            if student_key(row) in self.known or student_key(row) in self.pending:
                continue
            unseen = unseen or row
            if row["feasible"]:
                unseen = row
                break
        if unseen is not None:
            self.study.enqueue_trial(student_params(self.space, unseen))

    def _record(self, rows: Sequence[Row], write: bool = True) -> None:
        self.rows.extend(rows)
        self.known.update((student_key(r), r) for r in rows)
        self.scored += sum(1 for r in rows if r["inherited_val_acc"] is not None)
        self.unwritten.extend(rows)
        if write:  # one part per batch: a part is one write to the storage
            self.writer.append(self.unwritten)
            self.unwritten = []

    def scored_batch(self, batch: list[Row], scores: list[float]) -> None:
        """Record a batch's inherited accuracies and tell the study each of its trials."""
        now = time.time() - self.started
        for row, score in zip(batch, scores):
            row.update(inherited_val_acc=float(score), scored_at=now)
        for row in batch:
            _, trial = self.pending.pop(student_key(row))
            self.study.tell(trial, self._values(row))
        self._record(batch)

    def run(self, travelled: Any, gpus_per_trial: float, progress: Callable[[int], None]) -> int:
        """Score until `search.screen_subnets` students are (or the space has no more): batches
        in flight on every worker the cluster has. Returns the Ray tasks it ran."""
        target = self.space.search.screen_subnets
        limit = self.space.num_architectures()
        use_gpu = gpus_per_trial > 0
        workers = max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)))
        size = int(min(MAX_BATCH, max(8, math.ceil((target - self.scored) / (4 * workers)))))
        task = _score_batch.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
        data = ray.put(travelled)
        inflight: dict[Any, list[Row]] = {}
        tasks = 0
        while True:
            while len(inflight) < workers and (batch := self.ask(size, target, limit)):
                students = [StudentSpec(**{k[8:]: v for k, v in student_key(r)}) for r in batch]
                inflight[task.remote(self.space, self.store, self.epoch, data, students)] = batch
                tasks += 1
            if not inflight:
                return tasks
            [ready], _ = ray.wait(list(inflight), num_returns=1)
            where, scores = task_result(ready)
            self.places.append(where)
            self.scored_batch(inflight.pop(ready), scores)
            progress(self.scored)

    def finish(self, trials: int) -> list[Row]:
        """Rank the rows, keep `trials` of them, write the table whole; returns the kept rows
        in the order stage 3 trains them."""
        kept = kept_order(self.rows, self.space.objectives, trials)
        for row in self.rows:
            row.update(rank=kept.ranks.get(int(row["subnet_id"]), 0), kept=-1)
        for order, subnet_id in enumerate(kept.order):
            self.rows[self._index(subnet_id)]["kept"] = order
        self.writer.append(self.rows)
        self.writer.compact()
        return [self.rows[self._index(i)] for i in kept.order]

    def _index(self, subnet_id: int) -> int:
        return next(i for i, r in enumerate(self.rows) if int(r["subnet_id"]) == subnet_id)


@dataclasses.dataclass(frozen=True)
class Kept:
    """The ranks of the feasible scored rows (subnet_id -> rank, 1 = the screened front) and
    the subnet_ids kept, in the order stage 3 trains them."""

    ranks: dict[int, int]
    order: list[int]


def kept_order(rows: Sequence[Row], objectives: Sequence[tuple[str, str]], trials: int) -> Kept:
    """The screened front and its neighbourhood: non-dominated sorting of the feasible scored
    rows (inherited accuracy as val_acc); whole ranks are kept, 1, 2, ..., until `trials` are;
    of the rank that does not fit whole, members evenly spread along the first cost axis. Each
    rank's kept members are ordered by inherited accuracy, best first (the most promising
    students train first).

    Args:
        rows: screening rows.
        objectives: the run's objectives (name, "max" | "min").
        trials: how many to keep.

    Returns:
        Each ranked row's rank, and the kept subnet_ids in order.
    """
    scored = [r for r in rows if r["feasible"] and r["inherited_val_acc"] is not None]
    names = [name for name, _ in objectives]
    points = np.array([[r["inherited_val_acc"] if n == "val_acc" else r[n] for n in names] for r in scored], float)
    maximize = [mode == "max" for _, mode in objectives]
    cost = next((i for i, (_, mode) in enumerate(objectives) if mode == "min"), None)
    left = np.arange(len(scored))
    ranks: dict[int, int] = {}
    order: list[int] = []
    rank = 0
    while len(left):
        rank += 1
        members = left[non_dominated_mask(points[left], maximize)]
        left = np.setdiff1d(left, members)
        ranks.update((int(scored[i]["subnet_id"]), rank) for i in members)
        need = trials - len(order)
        if 0 < need < len(members) and cost is not None:
            along = members[np.argsort(points[members, cost], kind="stable")]
            members = along[np.round(np.linspace(0, len(along) - 1, need)).astype(int)]
        chosen = sorted(members[: max(need, 0)], key=lambda i: -float(scored[i]["inherited_val_acc"]))
        order.extend(int(scored[i]["subnet_id"]) for i in chosen)
    return Kept(ranks, order)
