"""The `thinkbatch-worker` deployment run by a real `prefect worker` (process pool), as
on a GPU node: a flow-run process killed with SIGKILL takes its engine with it, and a
run cancelled from Prefect (Cancelling, then the worker's SIGTERM) stops cleanly, commits
what it generated, frees its shards and shows Cancelled."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import engine_section, job_dict, prompt_rows, write_prompts
from tests.prefect_server import DEPLOYING, PrefectServer
from tests.processes import cmdline, left_alive, tree
from thinkbatch.schemas.job import JobSpec
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-home"), env=DEPLOYING)
    r = srv.cli("work-pool", "create", "thinkbatch-gpu", "--type", "process")
    assert r.returncode == 0, r.stderr
    r = srv.cli("--no-prompt", "deploy", "--name", "gpu", "--prefect-file",
                "deployments/prefect.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    srv.start_worker("w1", "thinkbatch-gpu")
    yield srv
    srv.stop()


def _planned_job(tmp_path: Path, tiny_model: str) -> dict[str, Any]:
    """A job whose plan is written, as the parent flow leaves it for its workers."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(400))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   engine_section(tiny_model, max_in_flight=16),
                   output={"flush_rows": 16}, shards={"rows_per_shard": 100},
                   scale={"workers": 2, "shared_filesystem": True,
                          "worker_deployment": "thinkbatch-worker/gpu"})
    spec = JobSpec.model_validate(job)
    layout = OutputLayout(spec.output.path, Storage(spec.storage))
    checkpoint.open_plan(layout, make_plan(spec, layout.store))
    return job


def _generating_worker_run(server: PrefectServer, job: dict[str, Any]) -> tuple[Any, int]:
    """Start a worker run; once it has committed rows, its id and process id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.env["PREFECT_API_URL"]}):
        run = run_deployment("thinkbatch-worker/gpu", parameters={"job": job}, timeout=0)
    data = Path(job["output"]["path"]) / "data"
    deadline = time.monotonic() + 600
    with server.client() as client:
        while True:
            fr = client.read_flow_run(run.id)
            assert time.monotonic() < deadline and not fr.state.is_final(), fr.state
            if fr.infrastructure_pid and list(data.glob("*.parquet")):
                return run.id, int(fr.infrastructure_pid.rsplit(":", 1)[-1])
            time.sleep(0.5)


def test_a_sigkilled_worker_run_takes_its_engine_with_it(server, tmp_path: Path,
                                                         tiny_model: str) -> None:
    _, pid = _generating_worker_run(server, _planned_job(tmp_path, tiny_model))
    started = tree(pid)
    assert any("EngineCore" in cmdline(p) for p in started), [cmdline(p) for p in started]
    os.kill(pid, signal.SIGKILL)
    assert not left_alive(started, 30)  # a busy 2-core machine: 10 s was too tight


def test_a_cancelled_worker_run_stops_cleanly_and_shows_cancelled(server, tmp_path: Path,
                                                                  tiny_model: str) -> None:
    from prefect.states import Cancelling

    job = _planned_job(tmp_path, tiny_model)
    run_id, pid = _generating_worker_run(server, job)
    started = tree(pid)
    with server.client() as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
        deadline = time.monotonic() + 120
        while not (state := client.read_flow_run(run_id).state).is_final():
            assert time.monotonic() < deadline, state
            time.sleep(1)
    assert state.type.value == "CANCELLED", state
    stopped = re.match(r"stopped by SIGTERM; (\d+) rows committed", state.message or "")
    assert stopped, state.message  # the flow stopped itself, cleanly
    out = Path(job["output"]["path"])
    committed = pq.read_table(out / "data", columns=["row_index"]).num_rows
    assert committed == int(stopped.group(1)) > 0
    assert not list((out / "_claims").glob("*.json"))  # freed for other workers
    assert not left_alive(started, 30)  # a busy 2-core machine: 10 s was too tight
