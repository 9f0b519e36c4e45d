"""The Ray Tune trainable of a search: one trial in a Ray worker.

`SearchTrainable` holds what every trial of a search runs with (the run, the data, the
teacher's logits and weights, the objectives, the space's trial settings), built once by
`run_search`; `SearchTrainable.for_tune` hands it to Ray Tune, through the object store.
An infeasible config reports at once (its exact costs, and the worst value of what it never
measured); the rest run `run_trial` in a local temporary folder and upload the weights to the
run's storage (no node needs the driver's disk).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import FAILURE, RETRY_REFUSED
from kdsearch.results.tables import RunPaths
from kdsearch.search.attempts import Attempts
from kdsearch.search.worker_data import shipped, worker_data
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Objective, Pairs, values_for_sampler
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import DataSpec, TrialSpec
from kdsearch.storage import StorageError, first_line


@dataclass(frozen=True)
class SearchTrainable:
    """What every trial of one search runs with; called once per trial in a Ray worker.

    `data` (loaded, or its DataSpec when read from files: each worker process loads that itself,
    kdsearch.search.worker_data), `cached_logits`, the teacher's weights (`ShippedTeacher`, when
    some trial runs it live) and the run's measured objectives (their definitions) are the
    driver's, through the object store (`for_tune`): a measured objective a user registered in
    the driver needs no registration in the worker.

    Every `checkpoint_every` epochs a trial's report carries a checkpoint, which Tune copies to
    the run's storage (tune/TRIAL/checkpoint_N, the latest two kept); a retried or resumed trial
    gets it back from `tune.get_checkpoint()` and continues after its epoch.

    `trial`, when given, is called as `trial(spec, report)` instead of training (see `noop_trial`).
    """

    run: RunPaths
    objectives: Pairs
    measured: tuple[Objective, ...] = ()
    threads: int = 1
    world_size: int = 1
    checkpoint_every: int = 0
    max_failures: int = 0
    data: Any = None
    cached_logits: Any = None
    teacher: Any = None
    trial: Callable[..., None] | None = None

    @classmethod
    def of(
        cls,
        space: SearchSpace,
        run: RunPaths,
        loaded: tuple[Any, Any, Any] = (None, None, None),
        trial: Callable[..., None] | None = None,
    ) -> SearchTrainable:
        """The trainable of a search of `space` into `run`.

        Args:
            space: the search's space (its objectives, resources and trial settings).
            run: the run's folder.
            loaded: `(data, cached_logits, shipped_teacher)`, from
                `kdsearch.search.run_folder.load_data_and_teacher`.
            trial: replaces training (benchmarks only: `noop_trial`).
        """
        measured = tuple(
            objective_table.get(name) for name, _ in space.objectives if objective_table.get(name).source == "measured"
        )
        data, cached_logits, teacher = loaded
        return cls(
            run=run,
            objectives=space.objectives,
            measured=measured,
            threads=max(1, int(space.resources.cpus)),
            world_size=int(space.resources.gpus) if space.resources.gpus >= 2 else 1,
            checkpoint_every=space.search.checkpoint_every,
            max_failures=space.search.max_failures,
            data=shipped(data),  # a DataSpec when read from files: each worker loads (and fetches) it
            cached_logits=cached_logits,
            teacher=teacher,
            trial=trial,
        )

    def for_tune(self, cpus: float, gpus: float) -> Any:
        """Ray Tune's trainable, each trial asking `cpus` and `gpus`; this object travels to the
        workers through the object store (tune.with_parameters), once per experiment."""
        return tune.with_resources(tune.with_parameters(_trainable, search=self), {"cpu": cpus, "gpu": gpus})

    def __call__(self, config: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(self.threads)
        meta = config["kdsearch"]
        spec = TrialSpec.from_dict(meta["spec"])
        device, where = _placement()
        computed = objective_table.computed(spec.student)
        never_trained = dict(zip([name for name, _ in self.objectives], values_for_sampler(computed, self.objectives)))
        untrained = {"epoch": 0, **computed, **never_trained, **where}  # the result of a trial that ends untrained
        if meta["infeasible"]:
            # over the budget: never trains; Optuna already holds its constraint values
            tune.report(untrained)
            return
        if self.trial is not None:
            self.trial(spec, lambda metrics: tune.report({**metrics, **where}))
            return
        trial_id = tune.get_context().get_trial_id()
        attempts = Attempts(self.run.store, trial_id)
        refused = self._refused(attempts, where["node_id"])
        if refused is not None:
            tune.report({**untrained, **refused})
            return
        try:
            self._train(spec, trial_id, attempts, device, where, untrained)
        except Exception as e:
            with contextlib.suppress(StorageError):  # uncounted, it is the next attempt's to judge (attempts.py)
                attempts.fail(f"{type(e).__name__}: {first_line(e)}")
            raise

    def _refused(self, attempts: Attempts, node_id: str) -> dict[str, Any] | None:
        """Why this attempt does not train (its last result's failure fields), or None."""
        try:
            own = attempts.begin(node_id, ray.get_runtime_context().get_job_id())
        except StorageError as e:  # a retry could not be counted against max_failures: none is made
            return {FAILURE: f"cannot record its attempt: {e}"}
        if len(own) > self.max_failures:  # past the space's max_failures: the trial fails, with the last reason
            return {FAILURE: own[-1], RETRY_REFUSED: True}
        return None

    def _train(
        self,
        spec: TrialSpec,
        trial_id: str,
        attempts: Attempts,
        device: Any,
        where: dict[str, str],
        untrained: dict[str, Any],
    ) -> None:
        """Train in a local temporary folder under the watchdog of `train.max_minutes`, then
        upload the weights to the run."""
        from kdsearch.train.checkpoint import STUDENT_FILES
        from kdsearch.train.faults import TrialFault, Watchdog, hang_grace_minutes
        from kdsearch.train.trial import TrialSetup, run_trial

        def report(metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
            saved = tune.Checkpoint.from_directory(checkpoint) if checkpoint is not None else None
            tune.report({**metrics, **where}, checkpoint=saved)

        require_data_here(self.data if isinstance(self.data, DataSpec) else self.data.spec, where["node_id"])
        data = worker_data(self.data)  # loaded once per worker process (a public archive fetched once per node)
        limit, grace = spec.train.max_minutes, hang_grace_minutes()
        guard = (
            Watchdog((limit + grace) * 60, lambda why: _end_hung_worker(attempts, trial_id, why), _hung(limit, grace))
            if limit is not None
            else contextlib.nullcontext()
        )
        with tempfile.TemporaryDirectory(prefix=f"kdsearch-{trial_id}-") as workdir, guard:
            try:
                setup = TrialSetup(
                    workdir=Path(workdir),
                    data=data,
                    teacher=self.teacher.build() if self.teacher is not None else None,
                    cached_logits=self.cached_logits,
                    device=device,
                    objectives=self.measured,
                    loader_workers=max(0, self.threads - 1),  # the trial's other CPUs decode images (unused for digits)
                    world_size=self.world_size,  # N >= 2 GPUs: one process each (kdsearch.train.parallel)
                    checkpoint_every=self.checkpoint_every,
                    resume_from=_restored_checkpoint(Path(workdir) / "restored"),
                )
                run_trial(spec, setup, report)
            except TrialFault as e:
                # its own fault (diverged, out of memory, past train.max_minutes): the same config would fail
                # again, so the trial ends here with the reason in its last result (kdsearch.results.outcomes:
                # failed) instead of raising, which would be retried up to max_failures times
                tune.report({**untrained, FAILURE: e.line()})
                return
            for name in STUDENT_FILES:  # the weights last: their presence means complete
                self.run.store.upload(Path(workdir) / name, f"{RunPaths.trial_dir(trial_id)}/{name}")


def _trainable(config: dict[str, Any], search: SearchTrainable) -> None:
    # Ray Tune's function trainable. Its name is the trainable's name in a run's saved Tune state
    # (tuner.pkl): `Tuner.restore` accepts only a trainable of the same name, so it stays `_trainable`
    search(config)


def _placement() -> tuple[Any, dict[str, str]]:
    """The trial's device (CUDA, or the CPU with one line per process when torch sees none of
    the GPUs Ray gave), and where it runs, in every report: Ray's node, Ray's GPU ids (a
    fraction: shared), torch's device name ("" on the CPU)."""
    import torch

    from kdsearch.train.trial import trial_device

    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    device = trial_device(gpu_ids)
    where = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(gpu_ids),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
    }
    return device, where


def noop_trial(spec: TrialSpec, report: Callable[[dict[str, Any]], None]) -> None:
    """A trial that trains nothing: it reports each of its epochs at once, with the student's
    exact costs and an accuracy made up from them. `run_search(..., trial=noop_trial)` runs the
    whole search loop (searcher, scheduler, recorder, study mirror) around it, so what is
    measured is the driver alone (benchmarks/driver_scale.py)."""
    computed = objective_table.computed(spec.student)
    acc = 1.0 - 1.0 / (1.0 + math.log1p(float(computed["flops"])))
    for epoch in range(1, spec.train.epochs + 1):
        report({"epoch": epoch, "val_acc": acc * epoch / spec.train.epochs, "train_loss": 1.0 / epoch, **computed})


def _hung(max_minutes: float, grace: float) -> str:
    return (
        f"TrialTimedOut: still running {max_minutes + grace:g} min after its start, past "
        f"train.max_minutes={max_minutes:g} plus {grace:g} min of grace, with no batch boundary "
        "reached (stuck in a call); its worker was ended"
    )


def _end_hung_worker(attempts: Attempts, trial_id: str, reason: str) -> None:
    """The watchdog's last resort for a trial stuck where no batch boundary comes (a C call, a
    dead collective): record the reason as this attempt's failure and end this worker process.
    Tune sees a lost worker and starts the trial again; that attempt counts this one against
    max_failures (kdsearch.search.attempts) and, past it, ends the trial with the reason."""
    with contextlib.suppress(Exception):
        attempts.fail(reason)
    print(f"kdsearch: trial {trial_id}: {reason}", file=sys.stderr, flush=True)
    os._exit(70)


def _restored_checkpoint(local: Path) -> Path | None:
    """The trial's latest checkpoint (a retry or a resumed run's unfinished trial), copied to
    `local` from the run's storage; None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    return Path(checkpoint.to_directory(str(local)))


def require_data_here(dspec: Any, node_id: str) -> None:
    """A dataset read from disk must be at the same path on every node that trains: say which
    node lacks it (the trial fails with this line as its error). A dataset with a public archive
    needs only the folder: the node fetches its files into it (kdsearch.train.fetch).

    Raises:
        KdsearchError: `dspec.root` is not a folder on this node.
    """
    if dspec.root and not Path(dspec.root).is_dir():
        raise KdsearchError(f"data.root: {dspec.root} does not exist on node {socket.gethostname()} ({node_id[:12]})")
