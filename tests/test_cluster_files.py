"""Every file in cluster/: the launcher configs against Ray's own schema and checks, the KubeRay manifests against
the fields of the v1 RayCluster/RayJob kinds, the shell scripts with bash -n and shellcheck, and no secrets anywhere."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
SCRIPTS = ["local.sh", "slurm.sbatch"]
# Every file of cluster/ and the tests below that check it: a new file needs its checks here
CHECKED = {*LAUNCHER, *KUBERAY, *SCRIPTS, "README.md"}

GPU_INSTANCE = re.compile(r"^(p\d|g\d|a2-|a3-|g2-|trn|inf)")  # AWS p5/g6..., GCP a2/a3/g2 machine types


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def test_every_file_in_cluster_is_checked():
    files = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == CHECKED


# --- Ray's cluster launcher ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_schema_and_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, ray_schema())
    # What `ray up` runs before launching anything: the provider's defaults filled in, then the schema again and
    # its own rules (the head type is a node type, the min_workers fit max_workers)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == name.removesuffix(".yaml")


def node_types(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    return head, {k: v for k, v in types.items() if k != config["head_node_type"]}


def machine_type(node: dict) -> str:
    return node["node_config"].get("InstanceType") or node["node_config"]["machineType"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(name):
    config = load(name)
    head, workers = node_types(config)
    assert head["resources"].get("GPU") == 0, "the head advertises no GPU: GPU trials go to the workers"
    assert not GPU_INSTANCE.match(machine_type(head)) and "guestAccelerators" not in head["node_config"]
    gpu_workers = {k: w for k, w in workers.items() if w["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type with GPUs"
    for key, worker in gpu_workers.items():
        assert GPU_INSTANCE.match(machine_type(worker)), f"{key}: {machine_type(worker)} is no GPU machine"
        assert worker.get("min_workers", 0) == 0, f"{key}: GPU nodes should scale from zero"
        assert 1 <= worker["max_workers"] <= config["max_workers"], key


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_this_repository_with_pip(name):
    config = load(name)
    # file_mounts copies the repository (ray up runs from its root) to ~/kdsearch on every node ...
    assert config["file_mounts"].get("~/kdsearch") == "."
    assert ".venv" in config["rsync_exclude"]
    # ... and a setup command pip-installs that copy, as the Makefile does
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*-e ~/kdsearch(\s|$)", setup), setup
    assert re.search(r'"ray\[default\]==[\d.]+"', setup), "the dashboard and job API need ray[default], pinned"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_shares_the_token_and_keeps_the_dashboard_local(name):
    config = load(name)
    # The token file reaches every node; every node starts in token mode
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start" in head_start and "RAY_AUTH_MODE=token ray start" in worker_start
    assert "--head" in head_start and "--address=$RAY_HEAD_IP" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def walk_keys(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}/{key}", str(key)
            yield from walk_keys(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_keys(value, f"{path}/{i}")


SECRET_KEY = re.compile(r"secret_access_key|access_key_id|session_token|password|private_key|client_secret|credentials")


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_configs_hold_no_secret_keys(name):
    found = [path for path, key in walk_keys(load(name)) if SECRET_KEY.search(key.lower())]
    assert not found, f"secret-looking keys in {name}: {found}"


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_no_secret_values_in_any_file(name):
    text = (CLUSTER / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert "PRIVATE KEY-----" not in text, "a private key"
    assert not re.search(r"\b[0-9a-f]{64}\b", text), "a Ray token (64 hex characters)"
    assert not re.search(r"aws_secret_access_key\s*[:=]", text, re.I)


def test_pinned_ray_versions_agree():
    """The launcher's pip pin, KubeRay's rayVersion and the Dockerfile's image tag name one Ray."""
    versions = {}
    for name in LAUNCHER:
        versions[name] = re.search(r'ray\[default\]==([\d.]+)"', "\n".join(load(name)["setup_commands"])).group(1)
    versions["raycluster"] = load("kuberay/raycluster.yaml")["spec"]["rayVersion"]
    versions["rayjob"] = load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    versions["README Dockerfile"] = re.search(r"FROM rayproject/ray:([\d.]+)-", (CLUSTER / "README.md").read_text())[1]
    assert len(set(versions.values())) == 1, versions


# --- KubeRay v1 ------------------------------------------------------------------------------------------------

# The fields of the ray.io/v1 kinds (KubeRay's ray-operator/apis/ray/v1 raycluster_types.go and rayjob_types.go,
# plus authOptions of v1.5.1+): a misspelt field is dropped by the API server without a word, so these lists catch
# it here. A field of a newer KubeRay goes into its list when a manifest starts to use it.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "env",
    "envFrom", "volumeMounts",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}


def cluster_spec(name: str) -> dict:
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[Path(name).name]
    assert doc["metadata"]["name"]
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(group: dict) -> list[dict]:
    found = group["template"]["spec"]["containers"]
    assert found, "a pod template without containers"
    for c in found:
        assert c["name"] and c["image"], c
    return found


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_fields_are_those_of_the_v1_kinds(name):
    spec = cluster_spec(name)
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"template", "rayStartParams"} <= set(head), set(head)
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
    # rayStartParams is a map of strings: a bare number or boolean there is rejected by the CRD
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), params
    if Path(name).name == "rayjob.yaml":
        job = load(name)["spec"]
        assert set(job) <= RAYJOB_SPEC, set(job) - RAYJOB_SPEC


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_has_a_cpu_head_and_gpu_workers(name):
    spec = cluster_spec(name)
    for c in containers(spec["headGroupSpec"]):
        for section in ("limits", "requests"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {}), "the head should need no GPU"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1 for c in containers(g))
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in containers(g)}
    assert len(images) == 1, f"head and workers should run one image: {images}"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_turns_token_authentication_on(name):
    auth = cluster_spec(name)["authOptions"]
    assert set(auth) <= AUTH_OPTIONS and auth["mode"] == "token"


def test_rayjob_runs_a_search_and_cleans_up():
    job = load("kuberay/rayjob.yaml")["spec"]
    entrypoint = job["entrypoint"]
    assert "kdsearch search " in entrypoint and "--address auto" in entrypoint and "--storage " in entrypoint
    space = re.search(r"kdsearch search (\S+\.yaml)", entrypoint)[1]
    assert (REPO / space).is_file(), f"the entrypoint's space {space} is not in the repository"
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0


# --- shell scripts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    run = subprocess.run(["bash", "-n", str(CLUSTER / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (Debian: shellcheck)")
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_passes_shellcheck(name):
    run = subprocess.run(["shellcheck", "--shell=bash", str(CLUSTER / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_local_sh_is_executable():
    assert os.access(CLUSTER / "local.sh", os.X_OK), "the README runs it as cluster/local.sh"


def test_slurm_script_in_the_shape_of_rays_docs():
    """What reading slurm.sbatch against Ray 2.60 and Slurm 22.05 asks of it; tests/test_slurm.py runs it."""
    lines = (CLUSTER / "slurm.sbatch").read_text().splitlines()
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)
    assert "#SBATCH --ntasks-per-node=1" in directives, "one Ray node per Slurm node (the documented flag)"
    # whole nodes with all their memory: --exclusive alone gets the partition's default memory
    assert {"#SBATCH --exclusive", "#SBATCH --mem=0"} <= set(directives)
    # the site-specific lines are marked and left off (`##SBATCH` is a comment to sbatch)
    assert "##SBATCH --partition=PARTITION" in lines and "##SBATCH --account=ACCOUNT" in lines
    text = "\n".join(lines)
    assert "PLACEHOLDERS" in text
    assert "ray symmetric-run" in text and "ray start --head" in text and "ray start --address" in text
    # symmetric-run appeared in 2.50 and its workers time out until 2.54 (ray#59795, ray#59794); a user may pick
    assert "(2, 54)" in text and "ray#59795" in text and "KDSEARCH_RAY_LAUNCH" in text
    # Ray's 30 s wait is short for several nodes: a longer default that the user's value overrides
    assert re.search(
        r"export RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT=\"\$\{RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT:-\d+\}\"", text
    )
    assert "export PYTHONUNBUFFERED=1" in text
    # `hostname --ip-address` is 127.0.1.1 on Debian and Ubuntu
    commands = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "hostname --ip-address" not in commands and "hostname -I" in commands
    assert "kdsearch search" in text and "--address auto" in text and "--storage" in text
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host 127.0.0.1" in text


# --- README ----------------------------------------------------------------------------------------------------


def test_readme_covers_every_file_and_the_token_and_dashboard():
    text = (CLUSTER / "README.md").read_text()
    for name in CHECKED - {"README.md"}:
        assert Path(name).name in text, f"README.md does not mention {name}"
    assert "## Token authentication" in text and "## The dashboard" in text
    for fact in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "~/.ray/auth_token"):
        assert fact in text
