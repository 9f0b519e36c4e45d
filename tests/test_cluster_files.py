"""Every file in cluster/: the launcher configs against Ray's own schema and checks (and the IAM and provisioning the
clouds ask for), the KubeRay manifests against the fields of the v1 RayCluster/RayJob kinds of KubeRay v1.6.0 and
against the space they run, the shell scripts with bash -n and shellcheck, every placeholder named in the README, and
no secrets anywhere."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import needs

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


def readme() -> str:
    return (CLUSTER / "README.md").read_text()


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


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


def readme_json(name: str) -> dict:
    """The JSON document that README.md shows under `NAME`: (an indented block)."""
    block = re.search(rf"^`{re.escape(name)}`[^\n]*:\n\n((?:    .*\n)+)", readme(), re.M)
    assert block, f"README.md shows no {name}"
    return json.loads(textwrap.dedent(block[1]))


def test_aws_head_may_pass_the_workers_role():
    """Launching an instance with a profile passes the profile's role: the head needs iam:PassRole on the workers'
    role. Ray's default head role (ray-autoscaler-v1: AmazonEC2FullAccess + AmazonS3FullAccess, Ray 2.60
    autoscaler/_private/aws/config.py) lacks it (ray#3190, #3199), so the head names a profile of its own, and
    README's IAM section gives that profile's role PassRole on the role of every worker profile."""
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_INSTANCE_PROFILE, _configure_iam_role
    from ray.autoscaler._private.util import prepare_config

    config = load("aws.yaml")
    head, workers = node_types(config)
    head_profile = head["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {w["node_config"]["IamInstanceProfile"]["Name"] for w in workers.values()}
    assert DEFAULT_RAY_INSTANCE_PROFILE not in {head_profile, *worker_profiles}
    assert head_profile not in worker_profiles, "the workers need the bucket, not the head's EC2 rights"
    # What `ray up` does with it: a head profile named in the config is kept, no default one is made (no AWS call)
    prepared = prepare_config(copy.deepcopy(config))
    prepared["head_node"] = {}
    assert _configure_iam_role(copy.deepcopy(prepared)) == prepared

    text = readme()
    passable = {
        resource
        for statement in readme_json("pass-worker-role.json")["Statement"]
        if statement["Effect"] == "Allow" and "iam:PassRole" in as_list(statement["Action"])
        for resource in as_list(statement["Resource"])
    }
    for profile in worker_profiles:
        # each profile holds the role of its name, which the head may pass
        assert f"--instance-profile-name {profile} --role-name {profile}" in text
        assert f"arn:aws:iam::ACCOUNT_ID:role/{profile}" in passable
    head_role = f"--role-name {head_profile}"
    assert f"--instance-profile-name {head_profile} {head_role}" in text
    assert f"{head_role} --policy-name kdsearch-pass-worker-role --policy-document file://pass-worker-role.json" in text
    assert f"{head_role} --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess" in text
    bucket = {r for s in readme_json("bucket.json")["Statement"] for r in as_list(s["Resource"])}
    assert bucket == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    for role in (head_profile, *worker_profiles):
        assert f"--role-name {role} --policy-name kdsearch-bucket --policy-document file://bucket.json" in text


def test_gcp_a3_workers_are_provisioned_as_google_offers_them():
    """a3-highgpu-8g: Spot, a reservation or DWS flex-start (not plain on-demand), gVNIC, a pd-balanced or pd-ssd
    boot disk in the provider's zone; `scheduling` one object as the Compute API has it (Ray's own GCP examples
    write a list: ray#46248). Ray's GCP node provider passes node_config to instances.insert as it is
    (Ray 2.60 autoscaler/_private/gcp/node.py create_instance), expanding only machineType and guestAccelerators."""
    config = load("gcp.yaml")
    provider = config["provider"]
    _, workers = node_types(config)
    a3 = {key: w["node_config"] for key, w in workers.items() if machine_type(w).startswith("a3-")}
    assert a3, "no a3 worker type"
    for key, node in a3.items():
        scheduling = node["scheduling"]
        assert isinstance(scheduling, dict), f"{key}: scheduling is one object"
        reserved = node.get("reservationAffinity", {}).get("consumeReservationType") == "SPECIFIC_RESERVATION"
        assert scheduling.get("provisioningModel") in {"SPOT", "FLEX_START"} or reserved, f"{key}: not on demand"
        assert scheduling["onHostMaintenance"] == "TERMINATE", "GPU VMs cannot live-migrate"
        assert [nic.get("nicType") for nic in node["networkInterfaces"]] == ["GVNIC"], key
        (boot,) = [disk for disk in node["disks"] if disk.get("boot")]
        disk_type = re.fullmatch(r"zones/([\w-]+)/diskTypes/([\w-]+)", boot["initializeParams"]["diskType"])
        assert disk_type and disk_type[1] == provider["availability_zone"], boot
        assert disk_type[2] in {"pd-balanced", "pd-ssd", "hyperdisk-balanced"}, (
            f"{key}: A3 boots from none of pd-standard"
        )
    for key, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert not isinstance(node.get("scheduling", {}), list), key
        # Every node type names its interface: Ray's _configure_subnet then picks no subnetwork of its own, and head
        # and workers share one (the installed Ray's source has that early return; its module needs Google's
        # client libraries to import)
        for nic in node["networkInterfaces"]:
            assert re.fullmatch(rf"regions/{provider['region']}/subnetworks/[\w-]+", nic["subnetwork"]), nic
            assert any(a.get("type") == "ONE_TO_ONE_NAT" for a in nic.get("accessConfigs", [])), "ray up's SSH, pip"
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    source = (ray_dir / "autoscaler" / "_private" / "gcp" / "config.py").read_text()
    assert '"networkInterfaces" in node_config or "networkConfig" in node_config' in source


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

# The fields of the ray.io/v1 kinds in KubeRay v1.6.0, the lowest KubeRay the manifests accept (authOptions.secretName
# is new in v1.6.0): ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go at that tag. A misspelt field,
# or one of a newer KubeRay, is refused by kubectl or dropped by the API server, so these lists catch it here.
KUBERAY_MIN = "1.6.0"
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources", "labels",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    "env", "envFrom", "volumeMounts",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTH_OPTIONS_V1_5 = {"mode"}  # v1.5.1 and v1.5.2; v1.5.0 has no authOptions


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


def test_kuberay_version_stated_is_the_one_its_fields_need():
    """secretName is in KubeRay v1.6.0's AuthOptions, not in v1.5.1's (only mode): README and manifests say >= 1.6.0."""
    assert any(set(cluster_spec(name)["authOptions"]) - AUTH_OPTIONS_V1_5 for name in KUBERAY)
    for text in [readme(), *((CLUSTER / name).read_text() for name in KUBERAY)]:
        assert re.search(rf"KubeRay (operator )?>= {re.escape(KUBERAY_MIN)}", text)
        assert not re.search(r"KubeRay (operator )?>= 1\.5", text)


def image_repository() -> str:
    """Where the image holds this repository: the WORKDIR of README.md's Dockerfile."""
    return re.search(r"^\s+WORKDIR (\S+)$", readme(), re.M)[1]


def space_in_repo(path: str) -> Path:
    """The file of this repository that a space path of a manifest names: absolute in the image, or relative to the
    repository (a `ray job submit --working-dir .` from its root)."""
    image = image_repository()
    if path.startswith("/"):
        assert path.startswith(image + "/"), f"{path} is not in the image's repository {image}"
        path = path.removeprefix(image + "/")
    found = REPO / path
    assert found.is_file(), f"the space {path} is not in the repository"
    return found


def manifest_space(name: str) -> Path:
    """The space a manifest runs: the RayJob's entrypoint, or the search its header submits to the RayCluster."""
    if Path(name).name == "rayjob.yaml":
        words = load(name)["spec"]["entrypoint"].split()
        return space_in_repo(words[words.index("search") + 1])
    return space_in_repo(re.search(r"kdsearch search (\S+\.yaml)", (CLUSTER / name).read_text())[1])


def test_rayjob_runs_a_search_and_cleans_up():
    job = load("kuberay/rayjob.yaml")["spec"]
    entrypoint = job["entrypoint"]
    assert "kdsearch search " in entrypoint and "--address auto" in entrypoint and "--storage " in entrypoint
    assert manifest_space("kuberay/rayjob.yaml").is_relative_to(REPO / "search_spaces")
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0


def test_rayjob_entrypoint_is_one_command_of_plain_words():
    """KubeRay pastes the entrypoint unquoted into the submitter's bash line (tests/kuberay.py): every word must be
    one that bash leaves as it is (no operator, expansion, quote or glob), so bash hands `ray job submit` exactly
    these words and Ray's shlex.join gives back the entrypoint. The space is named by its path in the image, the
    repository the containers work in."""
    from tests.kuberay import build_job_submit_command

    job = load("kuberay/rayjob.yaml")
    entrypoint = job["spec"]["entrypoint"]
    words = entrypoint.split()
    unsafe = [word for word in words if shlex.quote(word) != word]
    assert not unsafe, f"words bash would not pass on as written: {unsafe}"
    assert shlex.join(words) == entrypoint.strip()
    command = build_job_submit_command(job["spec"], "kdsearch-head-svc.default.svc.cluster.local:8265", "id")
    line = " ".join(command)
    assert f" -- {entrypoint.strip()} ; fi ; " in line
    assert PurePosixPath(words[words.index("search") + 1]).is_absolute()
    spec = cluster_spec("kuberay/rayjob.yaml")
    work_dirs = {c.get("workingDir") for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in containers(g)}
    assert work_dirs == {image_repository()}


def test_submit_command_is_kuberays():
    """tests/kuberay.py gives the words KubeRay v1.6.0's own tests expect of BuildJobSubmitCommand (job_test.go:
    TestBuildJobSubmitCommandWithK8sJobMode and TestBuildJobSubmitCommandWithK8sJobModeAndYAML)."""
    from tests.kuberay import build_job_submit_command, generate_job_id, go_quote, submitter_command

    address = "http://127.0.0.1:8265"
    status = ["if", "!", "ray", "job", "status", "--address", address, "testJobId", ">/dev/null", "2>&1", ";", "then"]
    submit = ["ray", "job", "submit", "--address", address, "--no-wait"]
    tail = ["--", "echo no quote 'single quote' \"double quote\"", ";", "fi", ";"]
    follow = ["ray", "job", "logs", "--address", address, "--follow", "testJobId"]
    template = {
        "runtimeEnvYAML": "test: test",
        "metadata": {"testKey": "testValue"},
        "rayClusterSpec": {"rayVersion": "2.6.0"},
        "entrypoint": "echo no quote 'single quote' \"double quote\"",
        "entrypointNumCpus": 1,
        "entrypointNumGpus": 0.5,
        "entrypointResources": '{"Custom_1": 1, "Custom_2": 5.5}',
    }
    assert build_job_submit_command(template, address, "testJobId") == [
        *status, *submit,
        "--runtime-env-json", go_quote('{"test":"test"}'),
        "--metadata-json", go_quote('{"testKey":"testValue"}'),
        "--submission-id", "testJobId",
        "--entrypoint-num-cpus", "1.000000",
        "--entrypoint-num-gpus", "0.500000",
        "--entrypoint-resources", go_quote('{"Custom_1": 1, "Custom_2": 5.5}'),
        *tail, *follow,
    ]  # fmt: skip
    with_yaml = {
        "runtimeEnvYAML": 'working_dir: "https://example.com/a.zip"\npip: ["python-multipart==0.0.6"]\n',
        "metadata": {"testKey": "testValue"},
        "rayClusterSpec": {"rayVersion": "2.6.0"},
        "entrypoint": template["entrypoint"],
    }
    assert build_job_submit_command(with_yaml, "127.0.0.1:8265", "testJobId") == [
        *status, *submit,
        "--runtime-env-json", go_quote('{"working_dir":"https://example.com/a.zip","pip":["python-multipart==0.0.6"]}'),
        "--metadata-json", go_quote('{"testKey":"testValue"}'),
        "--submission-id", "testJobId",
        *tail, *follow,
    ]  # fmt: skip
    assert go_quote('{"a": "b\\c"}') == '"{\\"a\\": \\"b\\\\c\\"}"'  # strconv.Quote
    shell = submitter_command(template, address, "testJobId")
    assert shell[:3] == ["/bin/bash", "-ce", "--"] and len(shell) == 4
    assert re.fullmatch(r"kdsearch-search-[bcdfghjklmnpqrstvwxz2456789]{5}", generate_job_id("kdsearch-search"))


def cpu_quantity(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) that Ray advertises for a group's pods: rayStartParams num-cpus/num-gpus, else what KubeRay
    v1.6.0 derives from the Ray container (pod.go generateRayStartCommand: the CPU limit, else the request, rounded
    up; addWellKnownAcceleratorResources: the nvidia.com/gpu limit)."""
    params = group["rayStartParams"]
    resources = containers(group)[0].get("resources", {})  # the Ray container is the first (utils.RayContainerIndex)
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    cpu = limits.get("cpu") or requests.get("cpu") or 0
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(cpu_quantity(cpu))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def mount_of(group: dict, path: str) -> dict | None:
    """The Ray container's volume mount that holds `path` (the deepest such mount), None when none does."""
    target = PurePosixPath(path)
    holding = [
        m
        for m in containers(group)[0].get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents
    ]
    return max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


def mounted_volume(group: dict, path: str) -> dict | None:
    """The pod volume whose mount in the Ray container holds `path` (the deepest such mount), None when none does."""
    mount = mount_of(group, path)
    if mount is None:
        return None
    (volume,) = [v for v in group["template"]["spec"].get("volumes", []) if v["name"] == mount["name"]]
    return volume


def space_path_in_image(name: str) -> PurePosixPath:
    """The space file a manifest runs, by its path in the image: absolute, so that its relative paths resolve
    against the image's search_spaces/ (a `--working-dir` upload would read them from Ray's copy of the folder)."""
    if Path(name).name == "rayjob.yaml":
        words = load(name)["spec"]["entrypoint"].split()
        path = words[words.index("search") + 1]
    else:
        path = re.search(r"kdsearch search (\S+\.yaml)", (CLUSTER / name).read_text())[1]
    assert PurePosixPath(path).is_absolute(), f"{name}: the space {path} is not named by its path in the image"
    return PurePosixPath(path)


def in_image(space_file: PurePosixPath, path: str) -> str:
    """A path of the space as kdsearch reads it in the image: a relative one resolved against the space's folder."""
    return posixpath.normpath(posixpath.join(space_file.parent, path))


def ray_env(group: dict) -> dict[str, str]:
    """The literal environment variables of a group's Ray container."""
    return {e["name"]: e["value"] for e in containers(group)[0].get("env", []) if "value" in e}


def mount_paths(group: dict) -> set[str]:
    """Where the Ray container mounts volumes."""
    return {m["mountPath"] for m in containers(group)[0].get("volumeMounts", [])}


def writable(group: dict, path: str) -> bool:
    """Whether the Ray container may write `path`: its mount and the volume's claim are not read-only."""
    mount, volume = mount_of(group, path), mounted_volume(group, path)
    return not mount.get("readOnly") and not (volume.get("persistentVolumeClaim") or {}).get("readOnly")


def data_folder(space: dict, space_file: PurePosixPath, group_name: str, group: dict) -> str:
    """Where a group's pods read the space's data: its data.root, else the datasets' cache, which each pod sets to
    one volume with KDSEARCH_DATA (kdsearch.train.fetch.default_data_root); the image's own ~/.cache would fetch
    once per pod, and a node that cannot reach the archive's URL would fail every trial."""
    if space["data"].get("root"):
        return in_image(space_file, space["data"]["root"])
    from kdsearch.train.fetch import DATA_ENV

    folder = ray_env(group).get(DATA_ENV)
    assert folder and PurePosixPath(folder).is_absolute(), f"{group_name}: no data.root in the space and no {DATA_ENV}"
    return folder


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_groups_that_run_trials_mount_the_data_and_hold_whole_trials(name):
    """The space the manifest runs (from search_spaces/): every group whose pods Ray can give a trial (the space's
    resources) mounts, where it reads the space's data (data.root, else the datasets' cache KDSEARCH_DATA names),
    one shared volume, which every trial reads; the head reads it too (the driver loads the data first, and fetches
    a public dataset there on first use: writable then). The head mounts the teacher's checkpoint, resolved against
    the space file in the image, writable (`kdsearch teacher finetune` saves it there). Nothing else is mounted: no
    stale path of an older space. A GPU group asks for nvidia.com/gpu in a multiple of the trial's GPUs, with the
    CPUs for that many trials, and no worker group is one no trial fits."""
    space = yaml.safe_load(manifest_space(name).read_text())
    space_file = space_path_in_image(name)
    checkpoint = in_image(space_file, space["teacher"]["checkpoint"])
    trial_cpus, trial_gpus = float(space["resources"]["cpus"]), float(space["resources"].get("gpus", 0))
    spec = cluster_spec(name)
    head = spec["headGroupSpec"]
    head_data = data_folder(space, space_file, "head", head)
    data = mounted_volume(head, head_data)
    assert data is not None and data.get("persistentVolumeClaim"), f"{name}: the driver reads {head_data} on the head"
    assert mounted_volume(head, checkpoint) is not None, f"{name}: the driver reads {checkpoint} on the head"
    assert writable(head, checkpoint), "`kdsearch teacher finetune` saves the teacher there"
    if not space["data"].get("root"):
        assert writable(head, head_data), "the driver fetches the dataset into its cache on first use"
    groups = {"head": head, **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    runs_trials = set()
    for group_name, group in groups.items():
        read = ["/dev/shm", head_data, *([checkpoint] if group is head else [])]
        used = {m["mountPath"] for path in read if (m := mount_of(group, path))}
        assert mount_paths(group) <= used, f"{name}: {group_name} mounts {mount_paths(group) - used}, never read"
        cpus, gpus = ray_resources(group)
        if cpus < trial_cpus or gpus < trial_gpus:
            continue
        runs_trials.add(group_name)
        folder = data_folder(space, space_file, group_name, group)
        assert folder == head_data, f"{group_name} reads the data at {folder}, the driver at {head_data}"
        volume = mounted_volume(group, folder)
        assert volume is not None, f"{name}: {group_name} runs trials but mounts nothing at {folder}"
        assert volume.get("persistentVolumeClaim") == data.get("persistentVolumeClaim"), (group_name, volume)
        if trial_gpus:
            per_pod = gpus / trial_gpus
            assert per_pod == int(per_pod), f"{group_name}: {gpus} GPUs hold {per_pod} trials of {trial_gpus}"
            assert cpus >= per_pod * trial_cpus, f"{group_name}: {cpus} CPUs for {per_pod} trials of {trial_cpus}"
            resources = containers(group)[0]["resources"]
            assert (
                resources["limits"]["nvidia.com/gpu"]
                == resources.get("requests", resources["limits"])["nvidia.com/gpu"]
            ), "Kubernetes wants an extended resource's request equal to its limit"
    assert runs_trials >= {g["groupName"] for g in spec["workerGroupSpecs"]}, "a worker group no trial fits"
    if trial_gpus:
        assert "head" not in runs_trials, "the head advertises no GPU"


# --- shell scripts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    run = subprocess.run(["bash", "-n", str(CLUSTER / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@needs(None if shutil.which("shellcheck") else "shellcheck is not installed (Debian: shellcheck)")
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
        assert readme_row(name), f"README.md's 'What each file needs' has no row for {name}"
    assert "## Token authentication" in text and "## The dashboard" in text
    for fact in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "~/.ray/auth_token"):
        assert fact in text


# Placeholders: values a user must replace. Each is written in a form no real value takes, and README's "What each
# file needs" names it in the file's row.
PLACEHOLDER = re.compile(
    r"ami-SET-ME[\w.-]*|YOUR-[A-Z]+(?:-[A-Z]+)*|registry\.example\.com/[\w./:-]*\w|\bBUCKET\b|\bACCOUNT_ID\b"
)


def readme_row(name: str) -> str:
    """The row of README's "What each file needs" table for a file of cluster/ (the KubeRay files share one)."""
    section = readme().split("## What each file needs", 1)[1].split("\n## ", 1)[0]
    key = "kuberay/*.yaml" if name.startswith("kuberay/") else name
    return next((line for line in section.splitlines() if line.startswith(f"| `{key}` |")), "")


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_every_placeholder_is_named_as_one(name):
    text = (CLUSTER / name).read_text()
    found = set(PLACEHOLDER.findall(text))
    assert found and re.search(r"placeholder", text, re.I), f"{name} says nothing of its placeholders"
    placeholders = readme_row(name).rsplit(" | ", 1)[-1]
    missing = sorted(p for p in found if p not in placeholders)
    assert not missing, f"README.md's row for {name} does not name the placeholders {missing}"
