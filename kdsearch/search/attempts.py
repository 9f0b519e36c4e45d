"""A trial's attempts, and which of them count against the space's `search.max_failures`.

Ray Tune counts every failure of a trial against its `max_failures`, a lost node included, so
a trial whose node went twice failed for good. kdsearch gives Tune no limit
(`FailureConfig(max_failures=-1)`) and counts here instead, in the run's storage, so that a lost
node costs a trial nothing: each attempt writes `trials/ID/attempts/N.json` (the node it runs
on) when it starts, and its error when it fails in a way it sees (an exception, its watchdog).
When an attempt starts, the earlier ones are read back:

- one that wrote an error is the trial's own failure;
- one of an earlier search driver (Ray job) ended with that driver (`--resume` after it died
  or was stopped): not the trial's failure;
- one that vanished without a word (its process gone: a lost node, a SIGKILL, the kernel's
  OOM killer, a crash) is a lost node when its node is dead, and the trial's own failure when
  its node lives (`node_alive`: its raylet still answers).

An attempt that finds more own failures than `max_failures` trains nothing: it ends the trial
as failed with the last reason (kdsearch.results.outcomes: FAILURE), and is not a retry
(RETRY_REFUSED).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from kdsearch.results.tables import RunPaths
from kdsearch.storage import Storage

RAYLET_TIMEOUT_S = 5.0  # how long a raylet has to accept a connection before its node counts as lost


def node_alive(node_id: str) -> bool:
    """Whether node `node_id` lives: Ray's GCS holds it alive and its raylet accepts a connection
    (asked from inside a Ray worker).

    NOTE: the GCS marks a node dead only once its health checks have failed for a while (2.60:
    every 3 s, 10 s timeout, 5 misses), and the trial's next attempt can start before that; the
    raylet's own port answers at once, refused or silent when the node is gone, open while it
    lives (a worker that crashed or was OOM-killed there leaves its raylet running).
    """
    import ray

    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None or not node["Alive"]:
        return False
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), RAYLET_TIMEOUT_S).close()
    except OSError:
        return False
    return True


@dataclass
class Attempts:
    """The attempts of one trial, in the run's storage.

    Args:
        store: the run's storage.
        trial_id: the Tune trial.
        alive: whether a node lives now (`node_alive` in a Ray worker).
    """

    store: Storage
    trial_id: str
    alive: Callable[[str], bool] = node_alive
    number: int = 0  # this attempt's, once begun

    def begin(self, node_id: str, job_id: str) -> list[str]:
        """Record this attempt, on node `node_id` under the driver's Ray job `job_id`; returns the
        trial's own failures so far, oldest first."""
        earlier = [json.loads(self.store.read_text(f"{self._dir}/{name}")) for name in self._names()]
        self.number = max((a["number"] for a in earlier), default=0) + 1
        self._write({"number": self.number, "node_id": node_id, "job_id": job_id, "started": time.time()})
        return [reason for a in earlier if (reason := self._own_failure(a, job_id)) is not None]

    def fail(self, reason: str) -> None:
        """Record why this attempt failed (before it raises, or before its worker is ended)."""
        self._write({**json.loads(self.store.read_text(self._rel(self.number))), "error": reason})

    def _own_failure(self, attempt: dict, job_id: str) -> str | None:
        if attempt.get("error"):
            return attempt["error"]
        if attempt["job_id"] != job_id:
            return None  # ended with its driver
        if not self.alive(attempt["node_id"]):
            return None  # its node was lost: not the trial's failure
        return (
            f"its worker process ended without an error on node {attempt['node_id'][:12]}, which lives "
            "(a crash or the OOM killer)"
        )

    @property
    def _dir(self) -> str:
        return f"{RunPaths.trial_dir(self.trial_id)}/attempts"

    def _rel(self, number: int) -> str:
        return f"{self._dir}/{number:04d}.json"

    def _names(self) -> list[str]:
        return [n for n in self.store.files(self._dir) if n.endswith(".json")]

    def _write(self, attempt: dict) -> None:
        self.store.write_text(self._rel(attempt["number"]), json.dumps(attempt))
