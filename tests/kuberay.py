"""What KubeRay's RayJob submitter pod runs, mirrored from KubeRay's Go source so a test can run it against a
local cluster (no Kubernetes runs here).

Read from ray-project/kuberay at tag v1.6.0, the lowest KubeRay that cluster/kuberay's manifests accept:
- ray-operator/controllers/ray/common/job.go `BuildJobSubmitCommand`: the words of the submitter's shell line,
  for submissionMode K8sJobMode (the manifests' mode; SidecarMode adds a dashboard health loop, not mirrored);
- ray-operator/controllers/ray/rayjob_controller.go `configureSubmitterContainer`: the container runs
  `utils.GetContainerCommand(["e"])` = `/bin/bash -ce --` with the words joined by single spaces as its one
  argument, and gets PYTHONUNBUFFERED=1, RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID and, with
  authOptions.mode token, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret (pod.go
  `SetContainerTokenAuthEnvVars`);
- ray-operator/controllers/ray/utils/util.go `GenerateRayJobId`: the RayJob's name, "-", 5 characters of
  k8s.io/apimachinery's rand.String.

The entrypoint is pasted as one word into that line, unquoted: bash splits it again, and shell operators in it
split the line.
"""

from __future__ import annotations

import json
import random
from typing import Any

import yaml

KUBERAY_VERSION = "v1.6.0"
K8S_JOB_MODE = "K8sJobMode"
# k8s.io/apimachinery/pkg/util/rand's alphabet (no vowels, no 0, 1, 3)
_RAND_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"


def go_quote(text: str) -> str:
    """Go's strconv.Quote for the printable-ASCII strings KubeRay quotes (JSON texts): a double-quoted literal with
    backslash and double quote escaped. json.dumps writes the same literal for printable ASCII; other text is
    refused rather than quoted differently from Go."""
    if not all(" " <= c <= "~" for c in text):
        raise ValueError(f"go_quote mirrors strconv.Quote for printable ASCII only: {text!r}")
    return json.dumps(text)


def go_json(value: Any, sort_keys: bool) -> str:
    """Go's JSON of `value`: no spaces, and <, >, & escaped as Go's json.Marshal escapes them. json.Marshal of a
    map[string]string (the metadata) sorts its keys; sigs.k8s.io/yaml's YAMLToJSON (the runtime env) keeps the
    YAML's order."""
    text = json.dumps(value, sort_keys=sort_keys, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in version.split("-")[0].split(".")[:3])
    return parts + (0,) * (3 - len(parts)) >= minimum


def build_job_submit_command(
    job_spec: dict[str, Any], dashboard_url: str, job_id: str, submission_mode: str = K8S_JOB_MODE
) -> list[str]:
    """The words of `BuildJobSubmitCommand(rayJob, submissionMode)` for a RayJob's `spec`, with the status the
    operator fills in: `dashboard_url` (Status.DashboardURL, host:port of the head Service's dashboard port) and
    `job_id` (Status.JobId). In the operator's order:

        if ! ray job status --address http://ADDR JOBID >/dev/null 2>&1 ;
        then ray job submit --address http://ADDR --no-wait [--runtime-env-json J] [--metadata-json J]
             [--submission-id JOBID] [--entrypoint-num-cpus F] [--entrypoint-num-gpus F]
             [--entrypoint-resources R] -- ENTRYPOINT ;
        fi ; ray job logs --address http://ADDR --follow JOBID
    """
    if submission_mode != K8S_JOB_MODE:
        raise ValueError(f"only {K8S_JOB_MODE} is mirrored (KubeRay {KUBERAY_VERSION}), not {submission_mode}")
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    entrypoint = job_spec["entrypoint"].strip()  # strings.TrimSpace
    status = ["ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1"]
    submit = ["ray", "job", "submit", "--address", address]
    follow = ["ray", "job", "logs", "--address", address, "--follow", job_id]

    # K8sJobMode: the submitter Job may retry, so a job already submitted is only followed
    cmd = ["if", "!", *status, ";", "then", *submit, "--no-wait"]
    if runtime_env_yaml := job_spec.get("runtimeEnvYAML", ""):
        cmd += ["--runtime-env-json", go_quote(go_json(yaml.safe_load(runtime_env_yaml), sort_keys=False))]
    metadata = job_spec.get("metadata") or {}
    if metadata and job_spec.get("rayClusterSpec") is not None:
        ray_version = job_spec["rayClusterSpec"]["rayVersion"]
        if not _version_at_least(ray_version, (2, 6, 0)):
            raise ValueError("the Ray version must be at least 2.6.0 to use the metadata field")
        cmd += ["--metadata-json", go_quote(go_json(metadata, sort_keys=True))]
    if job_id:
        cmd += ["--submission-id", job_id]
    if (cpus := float(job_spec.get("entrypointNumCpus", 0))) > 0:
        cmd += ["--entrypoint-num-cpus", f"{cpus:f}"]  # Go's %f
    if (gpus := float(job_spec.get("entrypointNumGpus", 0))) > 0:
        cmd += ["--entrypoint-num-gpus", f"{gpus:f}"]
    if resources := job_spec.get("entrypointResources", ""):
        cmd += ["--entrypoint-resources", go_quote(resources)]
    # "--" separates the entrypoint from the CLI's options; the entrypoint goes in as one word, unquoted
    cmd += ["--", entrypoint, ";", "fi", ";", *follow]
    return cmd


def submitter_command(job_spec: dict[str, Any], dashboard_url: str, job_id: str) -> list[str]:
    """The submitter container's command and args as exec runs them: `/bin/bash -ce -- "WORDS JOINED"`."""
    return ["/bin/bash", "-ce", "--", " ".join(build_job_submit_command(job_spec, dashboard_url, job_id))]


def submitter_env(dashboard_url: str, job_id: str, auth_token: str | None) -> dict[str, str]:
    """The variables the operator adds to the submitter container (the image's own come on top)."""
    env = {"PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_ADDRESS": dashboard_url, "RAY_JOB_SUBMISSION_ID": job_id}
    if auth_token is not None:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token}
    return env


def generate_job_id(rayjob_name: str, rng: random.Random | None = None) -> str:
    """`GenerateRayJobId`: the RayJob's name and 5 characters of k8s rand.String."""
    rng = rng or random.Random()
    return f"{rayjob_name}-{''.join(rng.choice(_RAND_ALPHANUMS) for _ in range(5))}"
