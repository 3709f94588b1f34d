"""The worker loop is quiet on the Prefect API: it learns that a shard is done from the
pipeline, never by reading task-run states. Measured on a real Prefect server on
127.0.0.1 from uvicorn's access log: the requests a run makes grow by a small constant
per shard, however long the shards generate."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, job_dict, prompt_rows, write_job, write_prompts
from tests.prefect_server import PrefectServer

PER_SHARD = 4  # the goal: API requests per shard


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-home"), access_log=True)
    yield srv
    srv.stop()


def _requests_of_a_run(server: PrefectServer, tmp_path: Path, tiny_model: str,
                       shards: int) -> list[tuple[str, str]]:
    """A replay job of `shards` shards of 1,000 rows: each takes seconds with four in
    flight, long enough for a loop that polls to show it."""
    rows = prompt_rows(1000 * shards)
    for i, r in enumerate(rows):
        r["raw_text"] = f"<think>thinking {i}</think>answer {i}"
    write_prompts(tmp_path / "in.parquet", rows, row_group_size=500)
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out", {"kind": "replay", "tokenizer": tiny_model},
        sampling={"structured_outputs": None}, shards={"rows_per_shard": 1000}))
    before = len(server.requests())
    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PREFECT_API_URL": server.url})
    assert r.returncode == 0, r.stderr[-3000:]
    time.sleep(1)  # the access log is written after the response
    return server.requests()[before:]


def test_requests_per_shard_are_a_small_constant(server, tmp_path: Path,
                                                 tiny_model: str) -> None:
    few = _requests_of_a_run(server, tmp_path / "few", tiny_model, shards=2)
    many = _requests_of_a_run(server, tmp_path / "many", tiny_model, shards=8)
    polls = [path for method, path in few + many if path.startswith("/api/task_runs/")]
    assert not polls, f"{len(polls)} task-run requests, e.g. {polls[:3]}"
    assert (len(many) - len(few)) / 6 <= PER_SHARD, (len(few), len(many))
