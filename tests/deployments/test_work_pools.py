"""The GPU work pools' base job templates (deployments/work-pools/), rendered with a GPU
deployment's job variables by Prefect's own machinery, as a worker renders them for a flow
run: the server's template and job-variable checks, `BaseJobConfiguration.
from_template_and_values` (with a client that refuses every call: the templates need no
Prefect API), `prepare_for_flow_run`. prefect-kubernetes and prefect-docker are not
installed here; their job configurations are the base class plus the fields their
templates fill, declared below. The Docker job goes on through docker-py (installed), as
prefect-docker hands it over, to the body of Docker's create-container request.

The image these jobs run is the repo's Dockerfile; a test builds it where a Docker engine
answers."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate
from prefect.workers.base import BaseJobConfiguration

ROOT = Path(__file__).resolve().parents[2]
POOLS = ROOT / "deployments" / "work-pools"
# What a GPU deployment's `job_variables` (deployments/prefect.yaml) may set.
JOB_VARIABLES = {"image": "ghcr.io/acme/thinkbatch:0.1.0-vllm0.32.0",
                 "env": {"PREFECT_LOGGING_LEVEL": "INFO"}}
FIXED_ENV = {"THINKBATCH_HOME": "/opt/thinkbatch", "HF_HUB_OFFLINE": "1",
             "VLLM_CACHE_ROOT": "/cache/vllm", "TRITON_CACHE_DIR": "/cache/triton"}
CREDENTIAL = re.compile(r"TOKEN$|SECRET|ACCESS_KEY|PASSWORD", re.I)  # names, not paths to files


class KubernetesJob(BaseJobConfiguration):
    """prefect-kubernetes' KubernetesWorkerJobConfiguration, as far as the template fills it."""
    namespace: str | None = None
    job_manifest: dict[str, Any]
    cluster_config: Any = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True


class DockerJob(BaseJobConfiguration):
    """prefect-docker's DockerWorkerJobConfiguration, as far as the template fills it."""
    image: str
    image_pull_policy: str | None = None
    networks: list[str] = []
    network_mode: str | None = None
    auto_remove: bool = False
    volumes: list[str] = []
    stream_output: bool = True
    mem_limit: str | None = None
    privileged: bool = False
    container_create_kwargs: dict[str, Any] | None = None


class NoApi:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def template(name: str) -> dict[str, Any]:
    t = json.loads((POOLS / name).read_text())
    validate_base_job_template(t)  # what `prefect work-pool create` has the server check
    is_valid_schema(t["variables"], preprocess=False)  # and a deployment's job variables
    return t


def render(cls: type[BaseJobConfiguration], name: str,
           values: dict[str, Any]) -> BaseJobConfiguration:
    t = template(name)
    validate(values, t["variables"], raise_on_error=True, preprocess=True,
             ignore_required=True, allow_none_with_default=True)  # the server's job-variable check
    config = asyncio.run(cls.from_template_and_values(t, values, client=NoApi()))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="gpu-worker-0"))
    return config


def docker_create_body(job: DockerJob) -> dict[str, Any]:
    """The container prefect-docker asks for (its `_build_container_settings`), as docker-py
    turns it into the create-container request's body."""
    from docker.api.client import APIClient
    from docker.models.containers import _create_container_args

    version = "1.43"
    kwargs = _create_container_args(dict(
        image=job.image, network_mode=job.network_mode, command=job.command,
        environment=job.env, auto_remove=job.auto_remove, labels=job.labels, name=job.name,
        volumes=job.volumes, mem_limit=job.mem_limit, privileged=job.privileged,
        version=version, **(job.container_create_kwargs or {})))
    kwargs.pop("name")
    return APIClient(version=version).create_container_config(**kwargs)


def pod_of(job: KubernetesJob) -> dict[str, Any]:
    return job.job_manifest["spec"]["template"]


@pytest.fixture(scope="module")
def k8s() -> KubernetesJob:
    return render(KubernetesJob, "kubernetes-gpu.json",
                  {**JOB_VARIABLES, "weights_claim": "kimi-weights"})


@pytest.fixture(scope="module")
def docker() -> DockerJob:
    return render(DockerJob, "docker-gpu.json",
                  {**JOB_VARIABLES, "weights_host_path": "/mnt/nvme/models"})


@pytest.mark.parametrize("name", ["kubernetes-gpu.json", "docker-gpu.json"])
def test_the_image_is_pinned_and_pulled_only_when_missing(name: str) -> None:
    variables = template(name)["variables"]
    props = variables["properties"]
    assert props["image_pull_policy"]["default"] == "IfNotPresent"
    for ok in (props["image"]["default"], "registry:5000/acme/thinkbatch:0.1.0",
               "thinkbatch@sha256:" + "a" * 64):
        validate({"image": ok}, variables, raise_on_error=True, ignore_required=True)
    for refused in ("thinkbatch:latest", "ghcr.io/acme/thinkbatch", "registry:5000/thinkbatch"):
        with pytest.raises(ValidationError):
            validate({"image": refused}, variables, raise_on_error=True, ignore_required=True)


def test_kubernetes_job(k8s: KubernetesJob) -> None:
    pod = pod_of(k8s)
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["image"] == JOB_VARIABLES["image"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    # The Kubernetes worker writes the job's env into the container; the template's own
    # variables stay beside the deployment's.
    assert k8s.env.items() >= {**FIXED_ENV, **JOB_VARIABLES["env"]}.items()
    assert k8s.command == "prefect flow-run execute"  # the image's entrypoint expects it

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    weights = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    assert weights["persistentVolumeClaim"] == {"claimName": "kimi-weights", "readOnly": True}
    cache = volumes[mounts["/cache"]["name"]]
    assert not mounts["/cache"].get("readOnly") and cache["hostPath"]["type"] == "DirectoryOrCreate"

    # Credentials by reference to a Secret, never as values in the job.
    assert container["envFrom"] == [{"secretRef": {"name": "thinkbatch-credentials",
                                                   "optional": True}}]
    assert not [k for k in k8s.env if CREDENTIAL.search(k)]

    # One engine per node: all 8 GPUs, and no second worker pod on the same node.
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 8
    [rule] = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert rule["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    # Long enough for the clean stop (benchmarks/clean_stop.py), and no longer than a
    # shard claim lives: past that the shards are free for other workers anyway.
    assert spec["terminationGracePeriodSeconds"] == 120


def test_docker_job(docker: DockerJob) -> None:
    body = docker_create_body(docker)
    host = body["HostConfig"]
    env = dict(e.split("=", 1) for e in body["Env"])
    assert body["Image"] == JOB_VARIABLES["image"]
    assert docker.image_pull_policy == "IfNotPresent"
    assert body["Cmd"] == ["prefect", "flow-run", "execute"]
    assert env.items() >= {**FIXED_ENV, **JOB_VARIABLES["env"]}.items()

    binds = {b.split(":")[1]: b for b in host["Binds"]}
    assert binds["/models"] == "/mnt/nvme/models:/models:ro"
    assert binds["/cache"] == "/var/cache/thinkbatch:/cache"
    # Credentials from files on the host, mounted read-only; the job names only their paths.
    assert binds["/run/secrets/thinkbatch"].endswith(":ro")
    assert not [k for k in env if CREDENTIAL.search(k)]
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "HF_TOKEN_PATH"):
        assert env[key].startswith("/run/secrets/thinkbatch/")

    # The node's GPUs, all of them, to the one container.
    [gpus] = host["DeviceRequests"]
    assert gpus["Count"] == -1 and gpus["Capabilities"] == [["gpu"]]
    assert host["IpcMode"] == "host" and host["AutoRemove"] is True


def _docker_engine() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.image
@pytest.mark.skipif(not _docker_engine(),
                    reason="no Docker engine answers here (`docker info` fails): the image "
                           "is not built")
def test_the_image_builds_and_starts_a_worker() -> None:
    tag = f"thinkbatch-test:{uuid4().hex[:12]}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=3600)
    try:
        out = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python3", tag, "-c",
             "import os, vllm, prefect, thinkbatch.flows.cli; "
             "print(os.environ['THINKBATCH_HOME'], os.environ['HF_HUB_OFFLINE'])"],
            capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-2:] == ["/opt/thinkbatch", "1"]
        # Through the entrypoint, as Prefect's workers start it.
        help_ = subprocess.run(["docker", "run", "--rm", tag, "prefect", "flow-run", "execute",
                                "--help"], capture_output=True, text=True, timeout=600)
        assert help_.returncode == 0 and "Execute a flow run" in help_.stdout, help_.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=300)
