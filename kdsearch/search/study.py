"""`kdsearch study`: a run's best student of each positional encoding, carried to other
resolutions, measured zero-shot and after a short fine-tune, as a Ray search of its own.

For each member (the most accurate completed trial of each encoding, or the trials named) and
each resolution, the trained weights are carried to the new token grid
(kdsearch.models.resolution: learned tables resampled, relative-bias tables resized, rotary and
sine-cosine recomputed, the patch size kept) and measured on the val and test splits at that
resolution: the zero-shot row. With `finetune_epochs` E > 0, each member is also fine-tuned E
epochs at each resolution from the carried weights, once per seed (its own + 1 .. + S, as
`confirm`), with its recipe's soft and hard terms and the teacher's cached logits at that
resolution. The teacher keeps the input size it was trained at: each image is resized to it
(kdsearch.train.teacher.ResizedInput), and its logits are cached once per resolution.

Every measurement is one row of the run's study.parquet, keyed by (trial, resolution, mode,
seed): a study interrupted or run again computes only what is missing (a fine-tuned row counts
as done only for the same E). kdsearch.results.study turns the rows into intervals and winners.
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
from kdsearch.results.study import FINETUNED, ZERO_SHOT
from kdsearch.results.tables import STUDY_COLUMNS, RunPaths, load_run, write_table
from kdsearch.search.confirm import RowRecorder, choose_members, grid_tuner, plain_row, run_space
from kdsearch.space.objectives import accuracy_and_cost
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import TrialSpec

STUDY_EXPERIMENT = "study-tune"  # Ray Tune's state of the latest study, in the run
# the fine-tune's learning rate, as a share of the member's: it starts from trained weights (DeiT and
# FlexiViT fine-tune at new resolutions with a fraction of the pre-training rate), without warmup
FINETUNE_LR_SCALE = 0.1

Row = dict[str, Any]


def choose_study_members(trials: Sequence[Row], objectives: Sequence[tuple[str, str]], ids: Sequence[str]) -> list[Row]:
    """The trials to study: those named (completed ones), else the most accurate completed trial
    of each positional encoding (the cheaper one on a tie), in the encodings' name order."""
    if ids:
        return choose_members(trials, objectives, None, ids)
    acc, cost = accuracy_and_cost(objectives)
    best: dict[str, Row] = {}
    for row in trials:
        if row["status"] != Status.COMPLETED or row.get(acc) is None:
            continue
        pe = str(row["student.pos_embed"])
        key = (float(row[acc]), -float(row.get(cost) or 0.0))
        if pe not in best or key > (float(best[pe][acc]), -float(best[pe].get(cost) or 0.0)):
            best[pe] = row
    if not best:
        raise KdsearchError("the run has no completed trial to study yet")
    return [best[pe] for pe in sorted(best)]


def check_resolutions(members: Sequence[Row], resolutions: Sequence[int]) -> None:
    """One line (KdsearchError) for a resolution no member can take: its patch size must divide it."""
    if not resolutions:
        raise KdsearchError("--resolutions: give at least one image size, e.g. --resolutions 12,16,24")
    for px in resolutions:
        for m in members:
            patch = int(m["student.patch_size"])
            if px < patch or px % patch:
                raise KdsearchError(
                    f"--resolutions {px}: trial {m['trial_id']}'s patch size {patch} does not divide it; "
                    f"give multiples of {patch}"
                )


def study_plan(members: Sequence[Row], resolutions: Sequence[int], epochs: int, seeds: int, done: dict) -> list[Row]:
    """The measurements still to make: (member, resolution, mode, seed) not completed in `done`
    (keyed as study.parquet's rows) with the same fine-tune epochs."""
    todo = []
    for m in members:
        own = int(m.get("train.seed") or 0)
        modes = [(ZERO_SHOT, own, 0)] + [(FINETUNED, own + i, epochs) for i in range(1, seeds + 1) if epochs > 0]
        for px in resolutions:
            for mode, seed, e in modes:
                row = done.get((m["trial_id"], int(px), mode, seed), {})
                if row.get("status") == Status.COMPLETED and int(row.get("finetune_epochs") or 0) == e:
                    continue
                todo.append({"trial_id": m["trial_id"], "img_size": int(px), "mode": mode, "seed": seed, "epochs": e})
    return todo


def plan_line(members: Sequence[Row], resolutions: Sequence[int], epochs: int, seeds: int, todo: int) -> str:
    """The study's plan in one line: what is studied where, and how much is left to compute."""
    runs = len(members) * len(resolutions) * (1 + (seeds if epochs else 0))
    return (
        f"studying {len(members)} trials ({', '.join(str(m['student.pos_embed']) for m in members)}) at "
        f"{', '.join(f'{px} px' for px in resolutions)}: {todo} of {runs} measurements to make"
        + (f", each fine-tuning {epochs} epochs" if epochs else " (zero-shot)")
    )


def run_study(
    location: str | os.PathLike,
    *,
    resolutions: Sequence[int],
    finetune_epochs: int = 0,
    seeds: int = 3,
    trial_ids: Sequence[str] = (),
    address: str | None = None,
    say: Callable[[str], None] = print,
) -> list[Row]:
    """Measure the chosen members of the run at `location` at each resolution.

    Args:
        location: the run (a folder or a URI).
        resolutions: the image sizes to study (square, in pixels).
        finetune_epochs: E > 0 adds, per resolution, E epochs of fine-tuning per seed.
        seeds: fine-tunings per member and resolution, with seeds its own + 1 .. + `seeds`.
        trial_ids: the members to study instead of each encoding's best (completed trials).
        address: the Ray cluster to join (`kdsearch.search.ray_session.cluster_address`).
        say: where the one-line plan goes.

    Returns:
        Every row of the run's study.parquet, those of earlier calls included.

    Raises:
        KdsearchError: a bad argument, a member that is not a completed trial, a run without its
            space or without a completed trial, or a cluster that cannot be joined.
    """
    from kdsearch.search.ray_session import check_reachable, cluster_address, ray_session

    if seeds < 1:
        raise KdsearchError(f"--seeds {seeds}: must be at least 1")
    if finetune_epochs < 0:
        raise KdsearchError(f"--finetune-epochs {finetune_epochs}: must be 0 (zero-shot only) or more")
    run = load_run(location)
    space = run_space(run.paths, run.meta)
    members = choose_study_members(run.trials, run.objectives, trial_ids)
    resolutions = sorted({int(px) for px in resolutions})
    check_resolutions(members, resolutions)
    done = {
        (r["trial_id"], int(r["img_size"]), r["mode"], int(r["seed"])): r for r in run.paths.rows(RunPaths.RESOLUTIONS)
    }
    todo = study_plan(members, resolutions, finetune_epochs, seeds, done)
    by_id = {m["trial_id"]: plain_row(m) for m in members}
    for item in todo:
        item["row"] = by_id[item["trial_id"]]
    say(plan_line(members, resolutions, finetune_epochs, seeds, len(todo)))
    if not todo:
        return list(done.values())
    address = cluster_address(address)
    if address:
        check_reachable(address)
    trained = int(members[0]["student.img_size"])
    with ray_session(address):
        inputs = {
            px: _inputs_at(space, run.paths, px, trained, any(t["img_size"] == px and t["epochs"] for t in todo), say)
            for px in sorted({t["img_size"] for t in todo})
        }
        _tuner(space, run.paths, done, todo, inputs, address).fit()
    return run.paths.rows(RunPaths.RESOLUTIONS)


def at_resolution(space: SearchSpace, px: int) -> SearchSpace:
    """The space with its data at `px` pixels (the students' image size follows the data)."""
    return dataclasses.replace(space, data=dataclasses.replace(space.data, img_size=int(px)))


def _inputs_at(
    space: SearchSpace, paths: RunPaths, px: int, trained: int, finetune: bool, say: Callable[[str], None]
) -> tuple:
    """What the measurements at `px` need, loaded once in the driver: the data, and for a fine-tune
    the teacher's logits at `px` (the teacher fed at the size it was trained at)."""
    from kdsearch.search.teacher_tasks import cached_teacher_logits, cached_teacher_views, shipped_teacher
    from kdsearch.search.worker_data import shipped
    from kdsearch.train.data import load_data
    from kdsearch.train.teacher import load_teacher

    here = at_resolution(space, px)
    data = load_data(here)
    if not finetune:
        return shipped(data), None, None
    teacher_space = None if trained == px else at_resolution(space, trained)
    teacher = load_teacher(space, train_if_missing=False, log=say)  # at the resolution it was trained at
    cache = paths.store.parent.child("cache")
    build = cached_teacher_views if data.random_augment else cached_teacher_logits
    logits = build(here, data, teacher, cache, space.resources.gpus, say, teacher_space=teacher_space)
    return shipped(data), logits, shipped_teacher(here, data, teacher, teacher_space)


def _tuner(
    space: SearchSpace, paths: RunPaths, done: dict, todo: list[Row], inputs: dict[int, tuple], address: str | None
) -> tune.Tuner:
    """The study's Ray Tune experiment: one trial per measurement in `todo`."""
    threads = max(1, int(space.resources.cpus))
    trainable = tune.with_parameters(_study_trainable, inputs=inputs, paths=paths, threads=threads)
    return grid_tuner(trainable, space, paths, STUDY_EXPERIMENT, {"item": todo}, [StudyRecorder(paths, done)], address)


def finetune_spec(spec: TrialSpec, epochs: int, seed: int) -> TrialSpec:
    """The spec a member is fine-tuned with: `epochs` epochs from its carried weights, at a tenth of
    its learning rate, without warmup. NOTE: its feature and attention terms are off: the teacher
    is fed at its own size, so its token grid is not the student's at another resolution."""
    train = dataclasses.replace(
        spec.train, epochs=epochs, seed=seed, lr=spec.train.lr * FINETUNE_LR_SCALE, warmup_epochs=0
    )
    recipe = dataclasses.replace(spec.recipe, feature_weight=0.0, attention_weight=0.0)
    return dataclasses.replace(spec, train=train, recipe=recipe)


def _study_trainable(config: dict[str, Any], inputs: dict[int, tuple], paths: RunPaths, threads: int) -> None:
    """One measurement in a Ray worker: the member carried to the resolution, fine-tuned when the
    item says so, then measured on the val and test splits there."""
    import torch
    from safetensors.torch import load as load_weights

    from kdsearch.models.resolution import carried_student
    from kdsearch.results.export import spec_of, trial_weights
    from kdsearch.search.worker_data import worker_data
    from kdsearch.space import objectives as objective_table
    from kdsearch.train.data import load_test
    from kdsearch.train.evaluation import evaluate, evaluate_test

    torch.set_num_threads(threads)
    item, px = config["item"], int(config["item"]["img_size"])
    spec = spec_of(item["row"])
    model = carried_student(spec.student, load_weights(trial_weights(item["row"], paths)), px)
    spec = dataclasses.replace(spec, student=model.spec, data=dataclasses.replace(spec.data, img_size=px))
    travelled, cached, teacher = inputs[px]
    data = worker_data(travelled)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    last: dict[str, Any] = {}
    weights = None
    if item["mode"] == FINETUNED:
        model, last, weights = _finetuned(spec, model, item, data, cached, teacher, paths, threads)
    model = model.to(device)
    computed = objective_table.computed(spec.student)
    tune.report(
        {
            **{k: v for k, v in last.items() if k in ("epoch", "train_loss")},
            "val_acc": evaluate(model, data, device),
            "test_acc": evaluate_test(model, load_test(spec.data), device, workers=max(0, threads - 1)),
            "flops": float(computed["flops"]),
            "params": float(computed["params"]),
            "weights": weights,
        }
    )


def _finetuned(
    spec: TrialSpec, model: Any, item: Row, data: Any, cached: Any, teacher: Any, paths: RunPaths, threads: int
) -> tuple[Any, dict[str, Any], str]:
    """Fine-tune the carried `model`; its weights are saved in the run's storage (their path returned)."""
    from safetensors.torch import load_file, save

    from kdsearch.models.student import build_student
    from kdsearch.train.checkpoint import WEIGHTS_FILE
    from kdsearch.train.trial import TrialSetup, run_trial

    spec = finetune_spec(spec, int(item["epochs"]), int(item["seed"]))
    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any]) -> None:
        last.update(metrics)
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})

    with tempfile.TemporaryDirectory(prefix="kdsearch-study-") as workdir:
        setup = TrialSetup(
            workdir=Path(workdir),
            data=data,
            teacher=teacher.build() if teacher is not None else None,
            cached_logits=cached,
            init_state={k: v.clone() for k, v in model.state_dict().items()},
            loader_workers=max(0, threads - 1),
        )
        run_trial(spec, setup, report)
        tuned = build_student(spec.student)
        tuned.load_state_dict(load_file(str(Path(workdir) / WEIGHTS_FILE)))
    rel = f"study/{item['trial_id']}/px{item['img_size']}/seed{item['seed']}.safetensors"
    paths.store.write_bytes(rel, save({k: v.contiguous() for k, v in tuned.state_dict().items()}))
    return tuned.eval(), last, rel


class StudyRecorder(RowRecorder):
    """Writes study.parquet as measurements end: one row per (trial, resolution, mode, seed),
    replaced when redone."""

    def __init__(self, paths: RunPaths, rows: dict):
        self.paths, self.rows = paths, dict(rows)

    def record(self, trial: Any, status: Status, error: str | None = None) -> None:
        item, last = trial.config["item"], trial.last_result or {}
        row, px = item["row"], int(item["img_size"])
        ok = status is Status.COMPLETED and last.get("test_acc") is not None
        sections = {f.name for f in dataclasses.fields(TrialSpec)}
        config = {k: v for k, v in row.items() if k.split(".")[0] in sections}
        config.update({"student.img_size": px, "data.img_size": px})
        self.rows[(item["trial_id"], px, item["mode"], int(item["seed"]))] = {
            **config,
            "trial_id": item["trial_id"],
            "pos_embed": str(row["student.pos_embed"]),
            "img_size": px,
            "trained_img_size": int(row["student.img_size"]),
            "mode": item["mode"],
            "seed": int(item["seed"]),
            "status": (Status.COMPLETED if ok else Status.FAILED).value,
            "val_acc": last.get("val_acc") if ok else None,
            "test_acc": last.get("test_acc") if ok else None,
            "flops": last.get("flops"),
            "params": last.get("params"),
            "finetune_epochs": int(item["epochs"]),
            "weights": last.get("weights") if ok else None,
            "wall_seconds": float(last.get("time_total_s", 0.0) or 0.0),
            "error": error or (None if ok else "no test accuracy was reported"),
            "finished_at": time.time(),
        }
        rows = sorted(self.rows.values(), key=lambda r: (r["trial_id"], r["img_size"], r["mode"], r["seed"]))
        write_table(rows, self.paths.store, RunPaths.RESOLUTIONS, STUDY_COLUMNS)
