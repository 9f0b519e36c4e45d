"""The `--address` token probe (`kdsearch.search.ray_session.accepts_unauthenticated`) against
real `cluster/local.sh` clusters of one head node: one that asks for its token, one started
without token authentication."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_local_cluster import LOCAL_SH, clean_env, parse_env, stop_cluster

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="local.sh needs Linux's /proc")

# A driver that joins through kdsearch (what `kdsearch search --address` does), printing any
# one-line notice it is given, then the probe's answer
PROBE_DRIVER = """
import sys
from kdsearch.search.ray_session import accepts_unauthenticated, init_ray
init_ray(sys.argv[1], say=lambda line: print("notice:", line))
print("accepts unauthenticated:", accepts_unauthenticated(sys.argv[1]))
"""


def probe(state: Path, *options: str) -> tuple[str, str, str]:
    """`local.sh start 0 [options]` (a head alone) at `state`, the probe driver run with the
    cluster's env, and the cluster stopped; returns the driver's stdout, the env's auth mode and
    the cluster's address."""
    try:
        started = subprocess.run(
            [str(LOCAL_SH), "--dir", str(state), "start", "0", *options, "--timeout", "90"],
            capture_output=True,
            text=True,
            timeout=150,
            env=clean_env(),
        )
        assert started.returncode == 0, started.stderr[-2000:]
        env = parse_env((state / "env").read_text())
        driver = subprocess.run(
            [sys.executable, "-c", PROBE_DRIVER, env["RAY_ADDRESS"]],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(**env),
            cwd=state.parent,
        )
        assert driver.returncode == 0, driver.stderr[-2000:]
        return driver.stdout, env["RAY_AUTH_MODE"], env["RAY_ADDRESS"]
    finally:
        stop_cluster(state)


@pytest.mark.timeout(600)
def test_the_token_probe_tells_a_cluster_with_a_token_from_one_without(tmp_path: Path) -> None:
    out, mode, _ = probe(tmp_path / "token")
    assert mode == "token"
    assert "accepts unauthenticated: False" in out and "notice:" not in out, out

    out, mode, address = probe(tmp_path / "open", "--no-token")
    assert mode == "disabled" and not (tmp_path / "open" / "auth_token").exists()
    assert "accepts unauthenticated: True" in out, out
    notices = [line for line in out.splitlines() if line.startswith("notice:")]
    assert notices == [
        f"notice: --address {address}: this Ray cluster accepts unauthenticated "
        "connections (RAY_AUTH_MODE=disabled): anyone who reaches its ports can run code on it"
    ], out
