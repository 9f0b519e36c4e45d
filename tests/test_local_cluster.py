"""cluster/local.sh: a head and two worker nodes as separate processes on this machine, joined with the
cluster's own token; after `stop` nothing they started is left."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="local.sh and this test need Linux's /proc"),
]

# A driver that joins the cluster and prints every alive node: its id, plasma socket, CPUs and GPUs.
NODES_DRIVER = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
nodes = [
    {
        "id": n["NodeID"],
        "socket": n["ObjectStoreSocketName"],
        "cpus": n["Resources"].get("CPU", 0.0),
        "gpus": n["Resources"].get("GPU", 0.0),
    }
    for n in ray.nodes() if n["Alive"]
]
print(json.dumps(nodes))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address or token, so only what local.sh hands out can join."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    ray_here = Path(sys.executable).parent / "ray"
    if ray_here.exists():
        env["KDSEARCH_RAY"] = str(ray_here)  # the Ray of the interpreter running the tests
    return {**env, **extra}


def stat_of(pid: int) -> tuple[int, int] | None:
    """(session id, start time) of a live process, None once it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[3]), int(fields[19])


def processes_in_sessions(sids: set[int]) -> dict[int, int]:
    """pid -> start time of every live process whose session is one of sids."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := stat_of(int(entry.name))) and st[0] in sids:
            found[int(entry.name)] = st[1]
    return found


def recorded_pids(state: Path) -> dict[str, int]:
    """The node pids local.sh recorded (nodes/NAME/pid survives `stop`, the pids file does not)."""
    return {d.name: int((d / "pid").read_text()) for d in sorted((state / "nodes").glob("*")) if (d / "pid").exists()}


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One `local.sh start 2` for the module (a start and a stop cost ~15 s each), with its state
    in a module folder, and a moto S3 server on 127.0.0.1 that only a driver's environment names
    (AWS_ENDPOINT_URL, as with MinIO, Ceph or R2): the nodes know credentials (moto takes any) and
    nothing of where the bucket is, no endpoint and no region; on their own they would look for
    the bucket at AWS, which is unreachable here. Yields (state, the start's result, the server's
    environment). Stopped afterwards, and whatever is left of the recorded node sessions killed by
    pid even when a test failed.

    NOTE: test_a_search_runs_across_nodes_with_its_run_in_a_bucket comes first in this file; the
    lifecycle test after it ends with `stop`."""
    from tests.s3 import s3_server

    folder = tmp_path_factory.mktemp("local-cluster")
    state = folder / "state"
    with s3_server(folder / "moto.log") as s3:
        nodes_env = {k: v for k, v in clean_env().items() if not k.startswith(("AWS_ENDPOINT_URL", "AWS_REGION"))}
        nodes_env.pop("AWS_DEFAULT_REGION", None)
        keys_only = {k: s3[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        nodes_env.update(keys_only, AWS_EC2_METADATA_DISABLED="true")  # no instance-metadata probe for credentials
        started = subprocess.run(
            [str(LOCAL_SH), "--dir", str(state), "start", "2", "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=120,
            env=nodes_env,
        )
        try:
            yield state, started, s3
        finally:
            stop_cluster(state)


def stop_cluster(state: Path) -> None:
    """`local.sh stop`, then SIGKILL to whatever is left of the recorded node sessions, by pid."""
    subprocess.run([str(LOCAL_SH), "--dir", str(state), "stop"], capture_output=True, timeout=90, env=clean_env())
    leftovers = processes_in_sessions(set(recorded_pids(state).values())) if (state / "nodes").exists() else {}
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(400)
def test_a_search_runs_across_nodes_with_its_run_in_a_bucket(
    cluster, digits_teacher_path: Path, tmp_path: Path
) -> None:
    """The module's head and two workers from local.sh, each in its own working directory, and its
    moto S3 server, which only the driver's environment names: `kdsearch search --address ...
    --storage s3://...` runs trials on the workers only, the workers' uploads and Ray Tune's state
    and checkpoints all reach that one bucket, and export reads them back."""
    import urllib.request

    from tests.helpers import write_space
    from tests.s3 import environment, list_keys, make_bucket
    from tests.test_storage_s3 import read_table

    state, started, s3 = cluster
    assert started.returncode == 0, started.stderr
    assert (state / "address").exists(), "the cluster was stopped: this test runs before the lifecycle test"
    runs = "s3://cluster-test/runs"
    # two trials that both train, at once: one per 1-CPU worker
    space = write_space(tmp_path, digits_teacher_path, trials=2, epochs=2)
    raw = yaml.safe_load(space.read_text())
    raw["budget"] = {"max_gflops": None}
    raw["early_stopping"] = {"enabled": False}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    make_bucket(s3, "cluster-test")
    address, auth = started.stdout.strip(), parse_env((state / "env").read_text())
    # the nodes as Ray's state API lists them, from the dashboard local.sh recorded (no driver to start)
    request = urllib.request.Request(
        f"{(state / 'dashboard').read_text().strip()}/api/v0/nodes",
        headers={"Authorization": f"Bearer {(state / 'auth_token').read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = [n for n in json.load(response)["data"]["result"]["result"] if n["state"] == "ALIVE"]
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    workers = {n["node_id"] for n in nodes if n["resources_total"].get("CPU") == 1.0}
    assert len(head) == 1 and len(workers) == 2 and not head & workers and len(nodes) == 3, nodes
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    kdsearch = Path(sys.executable).with_name("kdsearch")
    search = subprocess.run(
        [str(kdsearch), "search", str(space), "--address", address, "--storage", runs],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(**s3, **auth),
        cwd=driver_cwd,
    )
    assert search.returncode == 0, search.stderr[-3000:]
    assert "endpoint_override" not in search.stdout  # the URIs shown are the one the user wrote

    with environment(s3):
        trials = read_table(f"{runs}/digits_search/trials.parquet")
        epochs = read_table(f"{runs}/digits_search/epochs.parquet")
    assert len(trials) == 2
    assert (trials.status == "completed").all(), trials[["trial_id", "status", "error"]]
    assert set(trials.node_id) | set(epochs.node_id) <= workers  # never the 0-CPU head
    # a trial holds its 1-CPU worker from an epoch's start until the driver records the epoch, so
    # epochs of two trials that overlap in time ran on two nodes: then both workers served
    spans = [(r.trial_id, r.time - r.epoch_seconds, r.time, r.node_id) for r in epochs.itertuples()]
    together = [(a, b) for a in spans for b in spans if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]]
    assert all(a[3] != b[3] for a, b in together), together
    assert not together or trials.node_id.nunique() == 2

    # one bucket holds what the workers uploaded and what Ray Tune saved (its state, their checkpoints)
    keys = list_keys(s3, f"{runs}/digits_search")
    for _, row in trials.iterrows():
        assert f"trials/{row.trial_id}/model.safetensors" in keys
    tune_keys = [k for k in keys if k.startswith("tune/")]
    assert any(k.startswith("tune/experiment_state") for k in tune_keys), tune_keys
    assert any("/checkpoint_" in k for k in tune_keys), tune_keys
    assert list(driver_cwd.iterdir()) == []  # the run is in the bucket, not here
    best = trials.sort_values("val_acc").iloc[-1]
    exported = subprocess.run(
        [
            str(kdsearch),
            "export",
            f"{runs}/digits_search",
            "--trial",
            best.trial_id,
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**s3),
    )
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "s" / "model.safetensors").stat().st_size > 0


@pytest.mark.timeout(500)
def test_local_cluster_starts_joins_with_its_token_and_stops_everything(
    cluster, digits_teacher_path: Path, tmp_path: Path
):
    """One cluster's life from `local.sh start` to `stop`; on the way, a driver joins with the
    token and `ray job submit` runs a search on it (one cluster start for both: ~15 s each)."""
    state, started, _ = cluster
    assert started.returncode == 0, started.stderr

    # The address: printed alone on stdout, written to STATE/address, on a picked port
    address = started.stdout.strip()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address), started.stdout
    assert (state / "address").read_text().strip() == address
    assert int(address.split(":")[1]) != 6379

    # Every node recorded, alive, each the leader of its own session, in its own working directory
    pids_file = dict(line.split() for line in (state / "pids").read_text().splitlines())
    pids = recorded_pids(state)
    assert {name: str(pid) for name, pid in pids.items()} == pids_file
    assert sorted(pids) == ["head", "worker-1", "worker-2"]
    for name, pid in pids.items():
        assert stat_of(pid) is not None and stat_of(pid)[0] == pid, f"{name} (pid {pid}) is not a live session leader"
    cwds = {name: os.readlink(f"/proc/{pid}/cwd") for name, pid in pids.items()}
    assert cwds == {name: str((state / "nodes" / name / "cwd").resolve()) for name in pids}
    assert len(set(cwds.values())) == 3

    # The token: fresh, private, and what the env file points drivers to
    token_file = state / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token_file.read_text())
    assert token_file.stat().st_mode & 0o777 == 0o600
    env = parse_env((state / "env").read_text())
    assert env["RAY_AUTH_MODE"] == "token"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).resolve() == token_file.resolve()
    assert env["RAY_ADDRESS"] == address
    shown = subprocess.run(
        [str(LOCAL_SH), "--dir", str(state), "env"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert parse_env(shown.stdout) == env

    # A driver with the env joins and sees three alive nodes; one without the token is refused (run together:
    # the refusal takes Ray's connection timeout)
    with_token = subprocess.Popen(
        [sys.executable, "-c", NODES_DRIVER, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(**env),
        cwd=state.parent,
    )
    without_token = subprocess.Popen(
        [sys.executable, "-c", NODES_DRIVER, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=state.parent,
    )
    try:
        out, err = with_token.communicate(timeout=90)
        refused_out, refused_err = without_token.communicate(timeout=90)
    finally:
        for p in (with_token, without_token):
            p.kill()
            p.wait()
    assert with_token.returncode == 0, err
    nodes = json.loads(out.strip().splitlines()[-1])
    assert len(nodes) == 3 and len({n["id"] for n in nodes}) == 3
    assert sorted(n["cpus"] for n in nodes) == [0.0, 1.0, 1.0]  # a head without CPUs, two 1-CPU workers
    assert without_token.returncode != 0 and "InvalidAuthToken" in refused_err, (refused_out, refused_err[-2000:])

    # Each node has its own temp dir, and each alive node's object store lives in one of them
    temp_dirs = {name: (state / "nodes" / name / "temp_dir").read_text().strip() for name in pids}
    assert len(set(temp_dirs.values())) == 3
    owners = sorted(name for n in nodes for name, t in temp_dirs.items() if n["socket"].startswith(t + "/"))
    assert owners == ["head", "worker-1", "worker-2"]

    rayjob_entrypoint_runs_a_search(state, digits_teacher_path, tmp_path)

    # A second start on the same state folder refuses, and starts nothing
    again = subprocess.run(
        [str(LOCAL_SH), "--dir", str(state), "start", "1"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert again.returncode == 1 and "still runs" in again.stderr, again.stderr
    assert recorded_pids(state) == pids and (state / "address").read_text().strip() == address

    # What runs now: the three leaders and the Ray processes of their sessions (raylets, GCS, agents, ...)
    before = processes_in_sessions(set(pids.values()))
    assert set(pids.values()) <= set(before) and len(before) > 6

    stopped = subprocess.run(
        [str(LOCAL_SH), "--dir", str(state), "stop"], capture_output=True, text=True, timeout=90, env=clean_env()
    )
    assert stopped.returncode == 0, stopped.stderr
    still = {pid for pid, start in before.items() if (st := stat_of(pid)) and st[1] == start}
    assert not still, f"still running after stop: {still}"
    assert not processes_in_sessions(set(pids.values()))
    assert not (state / "pids").exists() and not (state / "address").exists() and not token_file.exists()
    status = subprocess.run(
        [str(LOCAL_SH), "--dir", str(state), "status"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert status.returncode == 1 and status.stdout.count("not running") == 3, status.stdout


def test_local_sh_commands_without_a_cluster(tmp_path: Path):
    """Bad usage is exit code 2; stop, status and env on a folder without a running cluster say so."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LOCAL_SH), "--dir", str(tmp_path / "none"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )

    assert run("start", "two").returncode == 2
    assert run("restart").returncode == 2
    stop = run("stop")
    assert stop.returncode == 0 and "nothing to stop" in stop.stderr
    assert run("status").returncode == 1
    assert run("env").returncode == 1
    assert not (tmp_path / "none").exists(), "commands that start nothing create nothing"


def rayjob_entrypoint_runs_a_search(state: Path, digits_teacher_path: Path, tmp_path: Path) -> None:
    """cluster/kuberay/rayjob.yaml's entrypoint, submitted as KubeRay's submitter pod submits it: the `bash -ce`
    line of BuildJobSubmitCommand (KubeRay v1.6.0, mirrored in tests/kuberay.py: `ray job status`, else
    `ray job submit --no-wait ... -- ENTRYPOINT`, then `ray job logs --follow`) with the operator's variables,
    runs a search to the end on this cluster as a Ray job.

    The entrypoint's paths in the image become this machine's by string replacement, each found exactly once:
    the space /home/ray/kdsearch/search_spaces/cifar10_vit_tiny.yaml (224px, a ViT-B teacher on a volume) ->
    a digits space of 2 trials that both train, and s3://BUCKET/runs -> a local folder; every other word stays
    as written. The submitter's shell has `ray` alone on PATH and no RAY_ADDRESS, as the submitter pod reaches
    only the dashboard: a `kdsearch` split off the line by a shell operator would fail there instead of running.
    The line's own exit status says nothing of the job (`ray job logs --follow` ends 0 either way): the job's
    record on the dashboard, which KubeRay polls, must say SUCCEEDED."""
    import urllib.request

    import pandas as pd

    from tests.helpers import write_space
    from tests.kuberay import generate_job_id, submitter_command, submitter_env

    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    spec = job["spec"]
    local_dir = tmp_path / "rayjob"
    local_dir.mkdir()
    space = write_space(local_dir, digits_teacher_path, trials=2, epochs=1)
    raw = yaml.safe_load(space.read_text())
    raw["budget"] = {"max_gflops": None}  # both trials train: a search with no trained trial fails
    raw["early_stopping"] = {"enabled": False}
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    runs = tmp_path / "rayjob-runs"
    entrypoint = spec["entrypoint"]
    for image_path, here in [
        ("/home/ray/kdsearch/search_spaces/cifar10_vit_tiny.yaml", str(space)),
        ("s3://BUCKET/runs", str(runs)),
    ]:
        assert entrypoint.count(image_path) == 1, (image_path, entrypoint)
        entrypoint = entrypoint.replace(image_path, here)
    spec = {**spec, "entrypoint": entrypoint}

    dashboard_url = (state / "dashboard").read_text().strip().removeprefix("http://")  # Status.DashboardURL
    job_id = generate_job_id(job["metadata"]["name"])
    token = (state / "auth_token").read_text().strip()
    bin_dir = local_dir / "bin"  # the submitter image's PATH, reduced to ray
    bin_dir.mkdir()
    (bin_dir / "ray").symlink_to(Path(sys.executable).with_name("ray"))
    env = clean_env(**submitter_env(dashboard_url, job_id, token), PATH=f"{bin_dir}:/usr/bin:/bin")
    env.pop("KDSEARCH_RAY", None)
    submitted = subprocess.run(
        submitter_command(spec, dashboard_url, job_id),
        capture_output=True,
        text=True,
        timeout=360,
        env=env,
        cwd=local_dir,
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]

    # What KubeRay reads to decide the RayJob's status: the dashboard's job record
    request = urllib.request.Request(
        f"http://{dashboard_url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        record = json.load(response)
    assert record["status"] == "SUCCEEDED", (record.get("message"), submitted.stdout[-3000:])
    assert record["entrypoint"] == entrypoint, "the Ray job is the whole entrypoint, not a piece of it"
    trials = pd.read_parquet(runs / "digits_search" / "trials.parquet")
    assert len(trials) == 2 and (trials.status == "completed").all(), trials[["trial_id", "status", "error"]]
    assert trials.node_id.notna().all()
