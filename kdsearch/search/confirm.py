"""`kdsearch confirm`: retrain a run's front members with several seeds, as a Ray search of its own.

A search selects its students on one seed's val accuracy; a confirmation retrains each
chosen member with S other seeds (`train.seed` = its own seed + 1 .. + S), with the same
data, the same teacher signal (the run's logit cache) and the same resources, and measures
each retrained student on the val split and on the held-out test split, which only this,
`eval` and `export` read. Every retraining is one row of the run's confirm.parquet, keyed by
(trial, seed): a confirmation interrupted or run again retrains only what is missing.
kdsearch.results.confirm turns the rows into means, intervals and the confirmed front.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import CONFIRM_COLUMNS, Run, RunPaths, load_run, write_table
from kdsearch.space.file import parse_space_text
from kdsearch.space.objectives import accuracy_and_cost
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TrialSpec

CONFIRM_EXPERIMENT = "confirm-tune"  # Ray Tune's state of the latest confirmation, in the run


def choose_members(
    trials: Sequence[dict[str, Any]], objectives: Sequence[tuple[str, str]], top: int | None, ids: Sequence[str]
) -> list[dict[str, Any]]:
    """The trials to confirm: those named (completed ones), else the front's `top` most accurate
    (all of the front when `top` is None)."""
    by_id = {r["trial_id"]: r for r in trials}
    if ids:
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KdsearchError(f"--trial: no trial {missing[0]} in this run")
        unfinished = [i for i in ids if by_id[i]["status"] != Status.COMPLETED]
        if unfinished:
            raise KdsearchError(f"--trial {unfinished[0]}: it did not complete ({by_id[unfinished[0]]['status']})")
        return [by_id[i] for i in ids]
    front = front_rows(trials, objectives)
    if not front:
        raise KdsearchError("the run has no completed trial to confirm yet")
    acc, _ = accuracy_and_cost(objectives)
    front = sorted(front, key=lambda r: -(r.get(acc) or 0.0))
    return front if top is None else front[:top]


def run_confirm(
    location: str | os.PathLike,
    *,
    seeds: int = 3,
    top: int | None = None,
    trial_ids: Sequence[str] = (),
    address: str | None = None,
    say: Callable[[str], None] = print,
    track: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Retrain the chosen members of the run at `location` with `seeds` seeds each.

    Args:
        location: the run (a folder or a URI).
        seeds: retrainings per member, with seeds its own + 1 .. + `seeds`.
        top: the front's `top` most accurate members (all of the front when None).
        trial_ids: the members to confirm instead of the front's (completed trials).
        address: the Ray cluster to join (`kdsearch.search.ray_session.cluster_address`).
        say: where the one-line plan goes.
        track: the experiment trackers each retraining is logged to (kdsearch.search.trackers;
            default: the space's `search.track`).

    Returns:
        Every row of the run's confirm.parquet, those of earlier confirmations included.

    Raises:
        KdsearchError: a bad `seeds`, a member that is not a completed trial, a run without
            its space or without a completed trial, or a cluster that cannot be joined.
    """
    from kdsearch.search.ray_session import check_reachable, cluster_address, ray_session
    from kdsearch.search.trackers import check_installed, parse_track

    if seeds < 1:
        raise KdsearchError(f"--seeds {seeds}: must be at least 1")
    run = load_run(location)
    space = run_space(run.paths, run.meta)
    members = choose_members(run.trials, run.objectives, top, trial_ids)
    trackers = parse_track(track) if track else space.search.track
    check_installed(trackers)  # a tracker's package missing: one line, before Ray starts
    done = {(r["trial_id"], int(r["seed"])): r for r in run.paths.rows(RunPaths.CONFIRM)}
    todo = [
        {"trial_id": m["trial_id"], "seed": seed, "row": plain_row(m)}
        for m in members
        for seed in _seeds(m, seeds)
        if done.get((m["trial_id"], seed), {}).get("status") != Status.COMPLETED
    ]
    kept = len(members) * seeds - len(todo)
    say(
        f"confirming {len(members)} trials x {seeds} seeds: {len(todo)} to train"
        + (f", {kept} already in {RunPaths.CONFIRM}" if kept else "")
    )
    if not todo:
        return list(done.values())
    address = cluster_address(address)
    if address:
        check_reachable(address)
    with ray_session(address):  # Ray's environment switches too, only until it returns
        _tuner(space, run, done, todo, address, say, trackers).fit()
    return run.paths.rows(RunPaths.CONFIRM)


def _tuner(
    space: SearchSpace,
    run: Run,
    done: dict[tuple[str, int], dict[str, Any]],
    todo: list[dict[str, Any]],
    address: str | None,
    say: Callable[[str], None],
    trackers: Sequence[str] = (),
) -> tune.Tuner:
    """The confirmation's Ray Tune experiment: one trial per retraining in `todo`, each with the
    data and teacher signal the driver loads once here."""
    from kdsearch.search.run_folder import load_data_and_teacher
    from kdsearch.search.worker_data import shipped

    store = run.paths.store
    tracking = []
    if trackers:  # one tracker run per retraining, grouped as RUN-confirm
        from kdsearch.search.tracker_backends import TrackedRun
        from kdsearch.search.trackers import TrackingCallback

        tracked = TrackedRun(f"{run.paths.name}-confirm", space.name, store, "tensorboard/confirm")
        tracking = [TrackingCallback(trackers, tracked, "confirm", [n for n, _ in run.objectives], say=say)]
    data, cached, teacher = load_data_and_teacher(space, store.parent.child("cache"), say)
    trainable = tune.with_parameters(
        _confirm_trainable,
        data=shipped(data),  # a DataSpec when read from files: each worker loads (and fetches) it
        cached_logits=cached,
        teacher=teacher,
        threads=max(1, int(space.resources.cpus)),
    )
    recorder = ConfirmRecorder(run.paths, done, [name for name, _ in run.objectives])
    return grid_tuner(trainable, space, run.paths, CONFIRM_EXPERIMENT, {"member": todo}, [recorder, *tracking], address)


def grid_tuner(
    trainable: Any,
    space: SearchSpace,
    paths: RunPaths,
    name: str,
    grid: dict[str, list[Any]],
    callbacks: Sequence[tune.Callback],
    address: str | None,
) -> tune.Tuner:
    """A Tune experiment of a run's own beside its search (confirm's retrainings, a study's
    measurements): one trial per item of the `grid`'s one key, each with the space's resources,
    concurrency and `max_failures`, its state under `name` in the run's storage.

    Args:
        trainable: the function trainable (its large inputs bound with `tune.with_parameters`).
        space: the run's space.
        paths: the run.
        name: the experiment's folder in the run.
        grid: {config key: the items, one trial each}.
        callbacks: Tune callbacks (the recorder of the rows, trackers).
        address: the cluster joined, or None (`reuse_on`: actors are reused on a local Ray).

    Returns:
        The Tuner, not yet fitted.
    """
    from kdsearch.search.ray_session import reuse_on

    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": space.resources.cpus, "gpu": space.resources.gpus}),
        param_space={key: tune.grid_search(items) for key, items in grid.items()},
        tune_config=tune.TuneConfig(max_concurrent_trials=space.search.max_concurrent, reuse_actors=reuse_on(address)),
        run_config=tune.RunConfig(
            name=name,
            storage_path=paths.store.path(),
            storage_filesystem=paths.store.fs,
            failure_config=tune.FailureConfig(max_failures=space.search.max_failures),
            callbacks=list(callbacks),
            verbose=0,
        ),
    )


def _seeds(member: dict[str, Any], n: int) -> list[int]:
    """The seeds a member is retrained with: its own + 1 .. + n (its search seed is the one it was selected on)."""
    own = int(member.get("train.seed") or 0)
    return [own + i for i in range(1, n + 1)]


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with numpy scalars (a Parquet row's) as Python values: what travels in a Tune config."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def run_space(paths: RunPaths, meta: dict[str, Any]) -> SearchSpace:
    """The space the run was started with (its stored space.yaml; relative paths in it resolve
    against the folder of the file the run was started from)."""
    if not paths.store.exists(RunPaths.SPACE):
        raise KdsearchError(f"{paths.uri}: the run has no {RunPaths.SPACE}; it cannot be retrained")
    base = Path(meta.get("space_file") or ".").parent
    return parse_space_text(
        paths.store.read_text(RunPaths.SPACE), source=paths.store.uri_of(RunPaths.SPACE), base_dir=base
    )


def _confirm_trainable(config: dict[str, Any], data: Any, cached_logits: Any, teacher: Any, threads: int) -> None:
    """One retraining in a Ray worker: the member's spec with another seed, trained as its search
    trial was, then measured on the val and the held-out test split."""
    import torch
    from safetensors.torch import load_file

    from kdsearch.models.student import build_student
    from kdsearch.results.export import spec_of
    from kdsearch.search.worker_data import worker_data
    from kdsearch.train.checkpoint import WEIGHTS_FILE
    from kdsearch.train.data import load_test
    from kdsearch.train.evaluation import evaluate_test
    from kdsearch.train.trial import TrialSetup, run_trial

    torch.set_num_threads(threads)
    member = config["member"]
    spec = spec_of(member["row"])
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=int(member["seed"])))
    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any]) -> None:
        last.update(metrics)
        tune.report(dict(metrics))

    with tempfile.TemporaryDirectory(prefix="kdsearch-confirm-") as workdir:
        setup = TrialSetup(
            workdir=Path(workdir),
            data=worker_data(data),
            teacher=teacher.build() if teacher is not None else None,
            cached_logits=cached_logits,
            loader_workers=max(0, threads - 1),
        )
        run_trial(spec, setup, report)
        model = build_student(spec.student)
        model.load_state_dict(load_file(str(Path(workdir) / WEIGHTS_FILE)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test_acc = evaluate_test(model.to(device), load_test(spec.data), device, workers=max(0, threads - 1))
    tune.report({**last, "test_acc": test_acc})


class RowRecorder(tune.Callback):
    """A Tune callback that records a row for each trial as it ends, completed or failed (with its
    error's text): `record` writes it (confirm's retrainings, a study's measurements)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trial, Status.COMPLETED)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from kdsearch.search.callbacks import trial_error_text

        self.record(trial, Status.FAILED, trial_error_text(trial))

    def record(self, trial: Any, status: Status, error: str | None = None) -> None:
        """Write the row of `trial`, which ended with `status`."""
        raise NotImplementedError


class ConfirmRecorder(RowRecorder):
    """Writes confirm.parquet as retrainings end: one row per (trial, seed), replaced when redone."""

    def __init__(self, paths: RunPaths, rows: dict[tuple[str, int], dict[str, Any]], objectives: list[str]):
        self.paths, self.rows, self.objectives = paths, dict(rows), objectives

    def record(self, trial: Any, status: Status, error: str | None = None) -> None:
        member, last = trial.config["member"], trial.last_result or {}
        row = member["row"]
        ok = status is Status.COMPLETED and last.get("test_acc") is not None
        config = {k: v for k, v in row.items() if k.split(".")[0] in {f.name for f in dataclasses.fields(TrialSpec)}}
        self.rows[(member["trial_id"], int(member["seed"]))] = {
            **config,
            "trial_id": member["trial_id"],
            "seed": int(member["seed"]),
            "train.seed": int(member["seed"]),
            "confirm_id": trial.trial_id,
            "status": (Status.COMPLETED if ok else Status.FAILED).value,
            "val_acc": last.get("val_acc") if ok else None,
            "test_acc": last.get("test_acc") if ok else None,
            **{
                m: last.get(m, row.get(m)) if m != "val_acc" else (last.get(m) if ok else None) for m in self.objectives
            },
            "epochs": int(last.get("epoch", 0) or 0),
            "wall_seconds": float(last.get("time_total_s", 0.0) or 0.0),
            "error": error or (None if ok else "no test accuracy was reported"),
            "finished_at": time.time(),
        }
        rows = sorted(self.rows.values(), key=lambda r: (r["trial_id"], r["seed"]))
        write_table(rows, self.paths.store, RunPaths.CONFIRM, CONFIRM_COLUMNS)
