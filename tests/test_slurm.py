"""cluster/slurm.sbatch on a real Slurm (munged, slurmctld, slurmd from Debian's packages, see
tests/slurm.py): `sbatch cluster/slurm.sbatch`, the very file users get, runs a digits search to
the end through its documented variables, into a moto bucket; the job ends COMPLETED, the run is
in the bucket with every trial once, and nothing the test started is left running."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import needs, write_space
from tests.s3 import environment, free_port, make_bucket, s3_server
from tests.slurm import alive, slurm_cluster, unavailable

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "cluster" / "slurm.sbatch"
BUCKET = "kdslurm"
UNAVAILABLE = unavailable()
needs_slurm = needs(UNAVAILABLE)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: munge's socket and Ray's (under TMPDIR/ray/session_.../sockets)
    must fit in 108 bytes, which pytest's tmp_path does not leave room for."""
    path = Path(tempfile.mkdtemp(prefix="kds-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("addresses", "head"),
    [
        ("127.0.1.1", ""),  # Debian's and Ubuntu's `hostname --ip-address`: never the head's address
        ("127.0.1.1 192.0.2.2 fd00::2", "192.0.2.2"),
        ("fe80::1 fd00::2", "fd00::2"),  # link-local IPv6 needs a scope: skipped
        ("::1 10.1.2.3", "10.1.2.3"),
        ("", ""),
    ],
)
def test_head_address_is_the_first_reachable_one(addresses: str, head: str):
    """The script's own pick_head_ip, cut out of the file and fed what `hostname -I` could print."""
    text = SBATCH.read_text()
    function = text[text.index("pick_head_ip() {") : text.index("\n}\n", text.index("pick_head_ip() {")) + 2]
    run = subprocess.run(
        ["bash", "-c", f"{function}\nprintf '%s\\n' \"$1\" | pick_head_ip", "-", addresses],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == head


def job_env(root: Path, space: Path, s3: dict[str, str], slurm_env: dict[str, str]) -> dict[str, str]:
    """The environment sbatch is run in: this one without any Ray address or token, plus the
    script's variables, the bucket's endpoint (the job's and every Ray node's, through srun's
    --export=ALL), and a home and a TMPDIR (Ray's temp dir) of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KDSEARCH_"))}
    for d in ("home", "t"):
        (root / d).mkdir()
    return {
        **env,
        **s3,
        **slurm_env,
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "t"),
        "KDSEARCH_SPACE": str(space),
        "KDSEARCH_STORAGE": f"s3://{BUCKET}/runs",
        "KDSEARCH_NAME": "slurm-digits",
        "KDSEARCH_VENV": sys.prefix,
        "KDSEARCH_RAY_PORT": str(free_port()),
        # The head on loopback: Ray's traffic stays on 127.0.0.1 (one node: symmetric-run allows it)
        "KDSEARCH_HEAD_IP": "127.0.0.1",
        # Ports a head takes by default (8265, 10001), free ones here: other Ray clusters may run beside
        "KDSEARCH_RAY_ARGS": f"--dashboard-port {free_port()} --ray-client-server-port {free_port()}",
    }


def read_trials(s3: dict[str, str], uri: str):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    with environment(s3):
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return pq.read_table(io.BytesIO(f.read())).to_pandas()


def decoy_raylet(root: Path) -> subprocess.Popen:
    """A process named raylet outside slurmd's namespace: `ray stop` kills it if it can see it."""
    shutil.copy("/bin/sleep", root / "raylet")
    return subprocess.Popen([str(root / "raylet"), "600"], start_new_session=True)


@needs_slurm
@pytest.mark.timeout(300)
def test_sbatch_runs_a_search_to_the_end_into_a_bucket(digits_teacher_path: Path, tmp_path: Path, short_tmp: Path):
    space = write_space(tmp_path, digits_teacher_path, trials=3, epochs=2)
    decoy = decoy_raylet(short_tmp)
    try:
        with s3_server(tmp_path / "moto.log") as s3:
            make_bucket(s3, BUCKET)
            with slurm_cluster(short_tmp / "slurm") as slurm:
                job_id = slurm.sbatch(
                    # One node with the test's 2 CPUs and no GPU, instead of the file's 4 x (64 CPUs, 8 GPUs)
                    *("--nodes=1", "--cpus-per-task=2", "--gpus-per-task=0", "--time=10:00"),
                    f"--output={short_tmp}/kdsearch-%j.out",
                    str(SBATCH),
                    env=job_env(short_tmp, space, s3, slurm.env),
                    cwd=REPO,
                )
                job = slurm.wait(job_id, timeout=240)
                out = (short_tmp / f"kdsearch-{job_id}.out").read_text()
                assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{out[-4000:]}"
                assert f"head: {slurm.node} at 127.0.0.1:" in out and ": symmetric-run" in out, out[-4000:]
                # symmetric-run's `ray stop` stopped the job's Ray, and only inside slurmd's namespace
                assert not slurm.job_processes(), slurm.job_processes()
                assert alive(decoy.pid), "ray stop reached a process outside slurmd's PID namespace"
            assert not slurm.leftovers(), slurm.leftovers()
            trials = read_trials(s3, f"s3://{BUCKET}/runs/slurm-digits/trials.parquet")
    finally:
        os.kill(decoy.pid, signal.SIGKILL)
        decoy.wait()
    assert len(trials) == 3 and trials.trial_id.is_unique, trials[["trial_id", "status"]]
    assert "failed" not in set(trials.status), trials[["trial_id", "status", "error"]]
    assert not list((short_tmp / "home" / ".ray").glob("kdsearch-*.token")), "the token's copy outlived the job"
