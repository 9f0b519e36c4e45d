"""A real Slurm on 127.0.0.1 for tests: munged, slurmctld and one slurmd from Debian's packages,
configured in a folder of the test's own with free ports, stopped by the pids it started.

slurmd, and so every job, job step and Ray process of its jobs, runs in a PID namespace of its
own with its own /proc: `ray stop` (which `ray symmetric-run` runs at its end) kills every Ray
process it can see, and inside the namespace it sees only the job's. A small init is the
namespace's pid 1: it reaps the processes that Ray daemonizes, passes SIGTERM on to slurmd, and
when it exits the kernel kills whatever is left in the namespace."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.s3 import free_port

# What a test of a real Slurm needs on PATH (Debian: slurmctld slurmd slurm-client munge; util-linux)
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "unshare")
SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))  # daemons live in sbin, off a user's PATH
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}

# The namespace's pid 1: runs argv[1:], forwards SIGTERM/SIGINT to it, reaps every child (its own and
# the orphans the namespace hands it), and exits with the first one's status.
INIT = """
import os, signal, sys
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: os.kill(child, s))
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""

SLURM_CONF = """\
ClusterName=kdsearch-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join((os.environ.get("PATH", ""), SBIN)))


def unavailable() -> str | None:
    """Why a real Slurm cannot run here (a reason for pytest.skip), or None when it can."""
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a test Slurm runs its daemons as root (SlurmUser=root, slurmd in a PID namespace)"
    if not Path("/proc/self/ns/pid").exists():
        return "no PID namespaces here (/proc/self/ns/pid)"
    return None


def pid_namespace(pid: int) -> str | None:
    """The PID namespace of a process, as its /proc link reads (`pid:[INODE]`); None once it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def alive(pid: int) -> bool:
    """A live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def cmdline(pid: int) -> str:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def session(pid: int) -> int | None:
    with suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[3])
    return None


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


@dataclass
class SlurmCluster:
    """A running test Slurm: `env` is what a client (sbatch, scontrol) needs besides os.environ."""

    root: Path
    node: str
    cpus: int
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespace: str | None = None  # slurmd's PID namespace, fixed once slurmd runs
    sessions: set[int] = field(default_factory=set)  # the sessions the daemons were started in

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=60, env={**os.environ, **self.env, **kw.pop("env", {})}, **kw
        )

    def node_state(self) -> str:
        out = self.run("scontrol", "show", "node", "-o", self.node).stdout
        return field_of(out, "State")

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> int:
        """Submit a job; its id. `env` is the job's whole environment (sbatch exports it all)."""
        done = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as KEY -> VALUE (kept by slurmctld for MinJobAge, 300 s, after the end)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(word.split("=", 1) for word in out.split() if "=" in word)

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job once it has ended (or the last state seen when `timeout` seconds have passed)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in DONE or time.monotonic() > deadline:
                return job
            time.sleep(1)

    def namespace_processes(self) -> dict[int, str]:
        """pid -> command line of every live process in slurmd's PID namespace (the init and slurmd included)."""
        if self.namespace is None:
            return {}
        return {p: cmdline(p) for p in all_pids() if pid_namespace(p) == self.namespace and alive(p)}

    def job_processes(self, settle: float = 10) -> dict[int, str]:
        """What runs in slurmd's namespace besides the init and slurmd, once it is empty or `settle`
        seconds have passed (a job's slurmstepd can outlive its COMPLETED state for a moment)."""
        daemons = {c for p in children(self.daemons["slurmd"].pid) for c in [p, *children(p)]}
        deadline = time.monotonic() + settle
        while (found := {p: c for p, c in self.namespace_processes().items() if p not in daemons}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        return found

    def leftovers(self) -> dict[int, str]:
        """Every live process this cluster started: in the daemons' sessions or in slurmd's namespace."""
        found = self.namespace_processes()
        found.update({p: cmdline(p) for p in all_pids() if session(p) in self.sessions and alive(p)})
        return found


def field_of(line: str, key: str) -> str:
    return next((w.split("=", 1)[1] for w in line.split() if w.startswith(f"{key}=")), "")


@contextmanager
def slurm_cluster(root: Path, cpus: int = 2, timeout: float = 30) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd (in its own PID namespace) with their files under `root` (keep it
    short: munge's socket path must fit in 108 bytes); the node idle on entry, every daemon stopped
    by pid on exit, whatever is left of their sessions and namespace killed."""
    node = os.uname().nodename
    cluster = SlurmCluster(root=root, node=node, cpus=cpus, env={"SLURM_CONF": str(root / "slurm.conf")})
    write_files(root, node, cpus)
    try:
        start_munge(cluster)
        start_daemon(cluster, "slurmctld", [which("slurmctld"), "-D", "-f", str(root / "slurm.conf")])
        start_slurmd(cluster)
        wait_idle(cluster, timeout)
        yield cluster
    finally:
        stop(cluster)


def write_files(root: Path, node: str, cpus: int) -> None:
    for d in ("munge", "state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    conf = SLURM_CONF.format(root=root, node=node, cpus=cpus, ctld_port=free_port(), slurmd_port=free_port())
    (root / "slurm.conf").write_text(conf)


def start_daemon(cluster: SlurmCluster, name: str, argv: list[str | None]) -> subprocess.Popen:
    """A daemon in the foreground, in a session of its own, its output in ROOT/NAME.out."""
    with open(cluster.root / f"{name}.out", "w") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cluster.root
        )
    cluster.daemons[name] = proc
    cluster.sessions.add(proc.pid)
    return proc


def start_munge(cluster: SlurmCluster) -> None:
    m = cluster.root / "munge"
    start_daemon(
        cluster,
        "munged",
        [
            which("munged"),
            "--foreground",
            "--force",
            f"--key-file={m / 'munge.key'}",
            f"--socket={m / 'socket'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        ],
    )
    wait_for(lambda: (m / "socket").exists(), 10, "munged's socket", cluster.root / "munged.out")


def start_slurmd(cluster: SlurmCluster) -> None:
    """slurmd under INIT in a new PID namespace with /proc mounted for it; the namespace recorded."""
    argv = [which("unshare"), "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", INIT]
    argv += [which("slurmd"), "-D", "-f", str(cluster.root / "slurm.conf"), "-N", cluster.node]
    proc = start_daemon(cluster, "slurmd", argv)

    def namespace_known() -> bool:
        ns = next((pid_namespace(c) for c in children(proc.pid)), None)
        if ns and ns != pid_namespace(proc.pid):
            cluster.namespace = ns
        return cluster.namespace is not None

    wait_for(namespace_known, 10, "slurmd's PID namespace", cluster.root / "slurmd.out")


def children(pid: int) -> list[int]:
    with suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    log = cluster.root / "slurmd.log"
    wait_for(lambda: cluster.node_state().startswith("IDLE"), timeout, f"node {cluster.node} idle", log)


def wait_for(ready, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"timed out waiting for {what}: {log}:\n{tail}")
        time.sleep(0.2)


def stop(cluster: SlurmCluster) -> None:
    """slurmd, slurmctld, munged in that order: SIGTERM by pid, SIGKILL after 15 s; then whatever is left
    in their sessions or slurmd's namespace, by pid."""
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is None:
            continue
        # slurmd: the signal goes to the namespace's init (unshare's child), which passes it to slurmd
        for pid in children(proc.pid) if name == "slurmd" else [proc.pid]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in cluster.leftovers():
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
