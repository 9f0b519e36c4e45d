"""`--track mlflow|wandb|tensorboard`: a search's (or confirmation's) trials in the team's tracker.

`TrackingCallback` is a Ray Tune Callback in the driver. Its hooks only read the trial's
config and result and put one small task on a queue; one background thread runs the tasks
against each backend (kdsearch.search.tracker_backends), so a tracker's network never slows
Tune's loop. A backend that raises is switched off with one line (once per tracker) and the
search goes on: a tracker never stops a search. Each tracker is an optional extra, checked
before Ray starts (`check_installed`).
"""

from __future__ import annotations

import importlib
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ray import tune

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.search.tracker_backends import BACKENDS, TrackedRun, front_table
from kdsearch.space.search_space import TRACKERS
from kdsearch.storage import first_line

log = logging.getLogger(__name__)

MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}
"""The module each tracker imports; its pip extra is kdsearch[NAME]."""

END_WAIT_SECONDS = 120.0  # how long the search's end waits for the trackers' queue to drain


def parse_track(values: Iterable[str] | None, option: str = "--track") -> tuple[str, ...]:
    """The trackers named (repeated or comma-separated), each once, in order.

    Args:
        values: `--track` values ("mlflow", "mlflow,wandb"), or None.
        option: the option named by the error.

    Returns:
        The tracker names.

    Raises:
        KdsearchError: a name that is not a tracker.
    """
    out: list[str] = []
    for value in values or ():
        for name in (n.strip() for n in str(value).split(",")):
            if name not in TRACKERS:
                raise KdsearchError(f"{option} {name!r}: not a tracker; allowed: {', '.join(TRACKERS)}")
            if name not in out:
                out.append(name)
    return tuple(out)


def check_installed(names: Sequence[str]) -> None:
    """Every tracker's package imports, else one line naming its pip extra.

    Args:
        names: the tracker names.

    Raises:
        KdsearchError: a tracker's package is missing.
    """
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            raise KdsearchError(
                f"--track {name}: {first_line(e)}; install it with: pip install 'kdsearch[{name}]'"
            ) from None


class TrackingCallback(tune.Callback):
    """The trials of one search (`kind` "search") or confirmation ("confirm") in the trackers
    `names`: one tracker run per trial (its config as parameters, each epoch's metrics with
    step = epoch, its final objectives and status), grouped under the run; the front and its
    hypervolume (from `summary`, called once at the end) on the parent."""

    def __init__(
        self,
        names: Sequence[str],
        run: TrackedRun,
        kind: str,
        objectives: Sequence[str],
        say: Callable[[str], None] = print,
        summary: Callable[[], dict[str, Any]] | None = None,
    ):
        self.names, self.run, self.kind, self.objectives = tuple(names), run, kind, list(objectives)
        self.say, self.summary = say, summary
        self._tasks: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._backends: dict[str, Any] = {}
        self._started: set[str] = set()  # the trials whose tracker runs exist

    def __getstate__(self) -> dict:
        return {**self.__dict__, "say": None, "summary": None, "_tasks": None, "_thread": None, "_backends": {}}

    def setup(self, **info: Any) -> None:
        self._backends = {name: BACKENDS[name]() for name in self.names}
        self._tasks = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="kdsearch-trackers", daemon=True)
        self._thread.start()
        self._put("start", self.run)

    def _put(self, method: str, *args: Any) -> None:
        if self._tasks is not None:
            self._tasks.put((method, args))

    def _work(self) -> None:
        """The background thread: each task against every backend still on, in order."""
        while True:
            method, args = self._tasks.get()
            try:
                if method == "stop":
                    return
                for name, backend in list(self._backends.items()):
                    try:
                        getattr(backend, method)(*args)
                    except Exception as e:  # a tracker never stops the search: it is switched off, once
                        del self._backends[name]
                        self._tell(f"--track {name}: {first_line(e)}; {name} is off for the rest of this {self.kind}")
            finally:
                self._tasks.task_done()

    def _tell(self, line: str) -> None:
        if self.say is not None:
            self.say(line)
        else:
            log.warning(line)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._started:  # a retried trial keeps its tracker run
            return
        self._started.add(trial.trial_id)
        self._put("trial_start", trial.trial_id, self._name(trial), self._params(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch")
        if not epoch:
            return
        keys = {*self.objectives, "val_acc", "train_loss", "test_acc", "lr", "epoch_seconds", "images_per_second"}
        self._put("epoch", trial.trial_id, int(epoch), _numbers({k: result.get(k) for k in keys}))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("trial_end", trial.trial_id, *self._ending(trial, errored=False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put("trial_end", trial.trial_id, *self._ending(trial, errored=True))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._thread is None:
            return
        try:
            summary = self.summary() if self.summary is not None else {}
        except Exception as e:  # the summary is the trackers' only: never the search's failure
            self._tell(f"--track: the {self.kind}'s summary could not be made ({first_line(e)})")
            summary = {}
        self._put("end", summary)
        self._put("stop")
        self._thread.join(END_WAIT_SECONDS)
        if self._thread.is_alive():
            self._tell(
                f"--track {', '.join(self._backends)}: still sending after {END_WAIT_SECONDS:.0f} s; left behind"
            )
        self._thread = None

    # ---- a trial's facts, read from its config and last result ---------------------------

    def _name(self, trial: Any) -> str:
        if self.kind == "confirm":
            member = trial.config["member"]
            return f"{member['trial_id']}-seed{member['seed']}"
        return trial.trial_id

    def _params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The trial's flat spec (student.*, recipe.*, train.*, data.*, teacher.*)."""
        if self.kind == "confirm":
            member = config["member"]
            row = {k: _plain(v) for k, v in member["row"].items() if k.split(".")[0] in SPEC_SECTIONS}
            return {**row, "train.seed": int(member["seed"]), "confirms": member["trial_id"]}
        return dict(config["kdsearch"]["spec"])

    def _ending(self, trial: Any, errored: bool) -> tuple[str, dict[str, float]]:
        """The trial's status and its final objectives (a never-trained trial's: its computed ones)."""
        last = trial.last_result or {}
        if self.kind == "confirm":
            ok = not errored and last.get("test_acc") is not None
            status = Status.COMPLETED if ok else Status.FAILED
            return status.value, _numbers({k: last.get(k) for k in (*self.objectives, "test_acc")})
        from kdsearch.search.searcher import outcome
        from kdsearch.space import objectives as objective_table
        from kdsearch.space.specs import TrialSpec

        status = outcome(trial.config, last, errored)
        if status.measured:
            values = {k: last.get(k) for k in self.objectives}
        else:
            computed = objective_table.computed(TrialSpec.from_dict(trial.config["kdsearch"]["spec"]).student)
            values = {k: computed[k] for k in self.objectives if k in computed}
        return status.value, _numbers(values)


SPEC_SECTIONS = ("student", "recipe", "train", "data", "teacher")


def search_summary(rows: Callable[[], list[dict[str, Any]]], paths: Any, objectives: Sequence[tuple[str, str]]):
    """The summary a search's trackers get at its end: the front as a table, its hypervolume and
    the hypervolume after each completed trial.

    Args:
        rows: the run's trials table rows (called at the end).
        paths: the run's RunPaths (its run.json holds the hypervolume's reference).
        objectives: the run's objectives.

    Returns:
        A callable making {"columns", "rows", "hypervolume", "history": [(trial n, value)]}.
    """

    def summary() -> dict[str, Any]:
        from kdsearch.results.hypervolume import hypervolume_of, run_reference
        from kdsearch.results.pareto import front_rows

        trials = rows()
        columns, table = front_table(front_rows(trials, objectives), [n for n, _ in objectives])
        reference, why = run_reference(paths, paths.meta(), objectives)
        hv = hypervolume_of(trials, objectives, reference, why_no_reference=why)
        history = [(int(h["trial"]), float(h["hypervolume"])) for h in hv.by_trial]
        return {"columns": columns, "rows": table, "hypervolume": hv.value, "history": history}

    return summary


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among `values` (a tracker's metric is a number)."""
    out = {}
    for k, v in values.items():
        v = _plain(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out
