"""While an embedded search runs, every socket its Ray listens on is on loopback.

The search runs as `kdsearch search` in a subprocess; the test polls psutil over that process's
whole tree (the driver, gcs_server, raylet, the dashboard and autoscaler heads, the agents, the
trial workers) for every listening inet socket, whichever process opened it, until it exits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil

from tests.helpers import train_every_trial, write_space

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: an IPv6 socket bound to 127.0.0.1
# Listeners of the embedded Ray that cannot be put on loopback, by process name; none in Ray 2.60.
# A listener of any other process off loopback fails the test.
EXCEPTIONS: dict[str, set[str]] = {}


def _listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening inet socket in `root`'s process tree."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        try:
            name = proc.name()
            found |= {
                (name, c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited between the listing and its sockets
    return found


def test_embedded_search_listens_on_loopback_only(tmp_path: Path, digits_teacher_path: Path) -> None:
    # trials that train: a search none of whose trials trained exits 1
    space = train_every_trial(write_space(tmp_path, digits_teacher_path, trials=2, epochs=1, sampler="random"))
    err = tmp_path / "stderr.txt"
    command = "from kdsearch.cli import main; main()"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", command, "search", str(space), "--storage", str(tmp_path / "runs")],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        root = psutil.Process(proc.pid)
        seen: set[tuple[str, str, int]] = set()
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(root)
            time.sleep(0.3)
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert proc.wait() == 0, text[-2000:]
    assert len(pd.read_parquet(tmp_path / "runs" / "digits_search" / "trials.parquet")) == 2

    names = {name for name, _, _ in seen}
    # the snapshots caught Ray up: its GCS, its raylet and a worker all listening
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), sorted(seen)
    exposed = sorted(
        (name, ip, port) for name, ip, port in seen if ip not in LOOPBACK and ip not in EXCEPTIONS.get(name, ())
    )
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert "Token authentication is enabled" not in text, text[-2000:]


def test_the_embedded_ray_never_joins_a_cluster_it_finds_on_the_machine() -> None:
    """A cluster started on this machine records its address in /tmp/ray/ray_current_cluster, where
    a bare ray.init() finds and joins it; kdsearch's embedded Ray is a new one all the same."""
    from ray.cluster_utils import Cluster

    from tests.test_local_cluster import clean_env

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        command = (
            "import ray; from kdsearch.search.ray_session import init_ray; init_ray(None); "
            "print(ray.get_runtime_context().gcs_address)"
        )
        joined = subprocess.run(
            [sys.executable, "-c", command], capture_output=True, text=True, timeout=120, env=clean_env()
        )
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert joined.stdout.split()[-1] != cluster.address
    finally:
        cluster.shutdown()
