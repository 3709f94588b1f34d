"""Scale-out as users run it: a real Prefect server on 127.0.0.1, a process work pool,
two `prefect worker` processes, output on the local S3 endpoint, the miniature model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import (CLI, ENGINE_IN_PROCESS, engine_section, job_dict, prompt_rows,
                            write_job, write_prompts)
from tests.prefect_server import DEPLOYING, PrefectServer

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-home"),
                        env={**DEPLOYING, **ENGINE_IN_PROCESS})
    for pool in ("thinkbatch-gpu", "thinkbatch-control"):
        r = srv.cli("work-pool", "create", pool, "--type", "process")
        assert r.returncode == 0, r.stderr
    r = srv.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    srv.start_worker("w1", "thinkbatch-gpu")
    srv.start_worker("w2", "thinkbatch-gpu")
    yield srv
    srv.stop()


def test_deploy_all_registers_every_deployment_and_the_schedule(server) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState

    with server.client() as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}"
                 for d in client.read_deployments()}
        assert names == {"generate-dataset/adhoc", "generate-dataset/nightly-example",
                         "thinkbatch-worker/gpu"}
        nightly = client.read_deployment_by_name("generate-dataset/nightly-example")
        assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
        deadline = time.monotonic() + 60
        while True:
            upcoming = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [nightly.id]},
                state=FlowRunFilterState(type={"any_": ["SCHEDULED"]})))
            if upcoming or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert upcoming, "the scheduled deployment has no upcoming runs"


def _job(tmp_path: Path, s3, bucket: str, tiny_model: str, rows: int) -> Path:
    s3.bucket(bucket)
    write_prompts(tmp_path / "in.parquet", prompt_rows(rows), row_group_size=50)
    return write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", f"s3://{bucket}/out", engine_section(tiny_model),  # type: ignore[arg-type]
        shards={"rows_per_shard": 50}, output={"flush_rows": 25},
        scale={"workers": 2, "claim_ttl_s": 15, "heartbeat_timeout_s": 20,
               "worker_deployment": "thinkbatch-worker/gpu"}))


def _ids(s3, bucket: str) -> list[str]:
    fs = pafs.S3FileSystem(endpoint_override=f"{s3.host}:{s3.port}", scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return pq.read_table(f"{bucket}/out/data", filesystem=fs, columns=["id"]).column(0).to_pylist()


def _worker_shards(server, bucket: str) -> dict[str, list[str]]:
    """Shard task runs per worker flow run of the job writing to `bucket` (the module's
    other jobs' workers are on the same server), as Prefect recorded them."""
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter

    with server.client() as client:
        dep = client.read_deployment_by_name("thinkbatch-worker/gpu")
        runs = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id={"any_": [dep.id]}))
                if r.parameters["job"]["output"]["path"] == f"s3://{bucket}/out"]
        return {r.name: sorted(t.name for t in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id={"any_": [r.id]}),
                    task_run_filter=TaskRunFilter(name={"like_": "shard-"})))
                for r in runs}, {r.name: r.state.type.value for r in runs}


def test_workers_need_their_deployment_on_the_server(server, s3, tiny_model, tmp_path) -> None:
    job = _job(tmp_path, s3, "check-scale", tiny_model, 50)
    r = subprocess.run([*CLI, "validate", str(job)], env=server.env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*CLI, "validate", str(job), "--set",
                        "scale.worker_deployment=thinkbatch-worker/missing"],
                       env=server.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "'thinkbatch-worker/missing' is not deployed on http://127.0.0.1:" in r.stderr


def test_a_worker_refuses_an_engine_its_platform_cannot_run(server, s3, tiny_model,
                                                            tmp_path) -> None:
    """The parent flows run on a CPU (deployments/prefect.yaml): a parent on the CPU build
    plans the Kimi preset (TP8 + DCP8) for two workers; each worker, here on the CPU build
    too, refuses it before its first claim (no model loads), and the parent says why."""
    s3.bucket("dcp-workers")
    write_prompts(tmp_path / "in.parquet", prompt_rows(20))
    job = write_job(tmp_path / "job.yaml", {
        "preset": "kimi-k2-thinking",
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
        "engine": {"model": tiny_model},  # the preset's layout; no hub for a refused job
        "shards": {"rows_per_shard": 10}, "output": {"path": "s3://dcp-workers/out"},
        "scale": {"workers": 2, "worker_retries": 0, "claim_ttl_s": 15,
                  "worker_deployment": "thinkbatch-worker/gpu"}})
    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], env=server.env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert s3.keys("dcp-workers", "out/_plan.json")  # the parent planned it
    assert not s3.keys("dcp-workers", "out/data/")
    assert re.search(r"2 shards are unfinished after 1 round\(s\) of workers; [\w-]+, [\w-]+ "
                     r"failed: .*\n *- engine\.decode_context_parallel_size: 8 needs a GPU "
                     r"build of vLLM", r.stderr), r.stderr[-3000:]


def _run_parent(server, job: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", str(job), "--no-progress"], env=server.env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_a_job_and_write_each_id_once(server, s3, tiny_model, tmp_path) -> None:
    job = _job(tmp_path, s3, "two-workers", tiny_model, 400)
    parent = _run_parent(server, job)
    out, err = parent.communicate(timeout=900)
    assert parent.returncode == 0, err[-3000:]
    assert sorted(_ids(s3, "two-workers")) == sorted(r["id"] for r in prompt_rows(400))
    shards, states = _worker_shards(server, "two-workers")
    assert len(shards) == 2 and all(shards.values()), shards  # both workers took shards
    assert set(states.values()) == {"COMPLETED"}
    # Each worker's figures, and the run's merged from them; the workers' files are gone.
    body = s3.client().get_object(Bucket="two-workers", Key="out/_manifest.json")["Body"]
    run = json.loads(body.read())["this_run"]
    assert set(run["workers"]) == set(shards)
    assert sum(w["rows_generated"] for w in run["workers"].values()) == run["rows_generated"] == 400
    assert run["metrics"]["status"] == {"ok": 400} and run["metrics"]["ttft_s"]["p50"] > 0
    assert not s3.keys("two-workers", "out/_workers/")
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with server.client() as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-figures"])))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["test-progress", "test-progress-worker-0", "test-progress-worker-1"])))
    assert set(json.loads(table.data)[0]) == {"figure", "output", "this run", *shards}
    assert sorted(a.key for a in progress) == ["test-progress", "test-progress-worker-0",
                                               "test-progress-worker-1"]
    assert [a.data for a in progress if a.key == "test-progress"] == [100]


def _running_worker_run(server) -> tuple[str, int] | None:
    """A worker flow run that is inside a shard now, and its process id."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState,
                                                TaskRunFilter, TaskRunFilterState)

    with server.client() as client:
        dep = client.read_deployment_by_name("thinkbatch-worker/gpu")
        for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [dep.id]},
                state=FlowRunFilterState(type={"any_": ["RUNNING"]}))):
            running = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [r.id]}),
                task_run_filter=TaskRunFilter(name={"like_": "shard-"},
                                              state=TaskRunFilterState(type={"any_": ["RUNNING"]}, name=None)))
            if running and r.infrastructure_pid:
                return r.name, int(r.infrastructure_pid.rsplit(":", 1)[-1])
    return None


def _worker_of(server, pid: int) -> str:
    """The `prefect worker` that started process `pid` (its parent or its group)."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for name, proc in server.workers.items():
        if proc.pid in (ppid, os.getpgid(pid)):
            return name
    raise AssertionError(f"no worker started pid {pid}")


def test_a_worker_killed_mid_shard_loses_nothing(server, s3, tiny_model, tmp_path) -> None:
    job = _job(tmp_path, s3, "killed-worker", tiny_model, 400)
    parent = _run_parent(server, job)
    deadline = time.monotonic() + 600
    while (found := _running_worker_run(server)) is None or not any(
            "/data/" in k for k in s3.keys("killed-worker", "out/")):
        assert time.monotonic() < deadline and parent.poll() is None, "no shard ever ran"
        time.sleep(0.5)
    victim_run, pid = found
    server.kill_worker(_worker_of(server, pid))  # SIGKILL: the worker and its flow run
    out, err = parent.communicate(timeout=900)
    assert parent.returncode == 0, err[-3000:]
    assert sorted(_ids(s3, "killed-worker")) == sorted(r["id"] for r in prompt_rows(400))
    shards, states = _worker_shards(server, "killed-worker")
    assert states[victim_run] == "CRASHED"
    survivors = [n for n in shards if n != victim_run and states[n] == "COMPLETED"]
    assert survivors
    cut_short = set(shards[victim_run]) & {s for n in survivors for s in shards[n]}
    assert cut_short, "the killed worker's shard was not finished by another worker"
