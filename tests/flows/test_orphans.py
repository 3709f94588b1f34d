"""A SIGKILLed `thinkbatch run` takes every process it started with it: vLLM's engine core,
its tensor-parallel workers, Prefect's temporary server, multiprocessing's resource
tracker. Run with TP=2 on vLLM's CPU build, which also shows that thinkbatch binds the
ranks' threads itself (VLLM_CPU_OMP_THREADS_BIND unset) and that TP=2 runs end to end."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_job, write_prompts
from tests.processes import cmdline, left_alive, tree
from thinkbatch.tasks import trace

pytestmark = pytest.mark.engine


def test_a_sigkilled_run_leaves_no_process_behind_then_tp2_finishes(
        tmp_path: Path, tiny_model: str) -> None:
    n = 200
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(tiny_model, tensor_parallel_size=2, max_in_flight=16),
        output={"flush_rows": 16}, shards={"rows_per_shard": 100}))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    path = tmp_path / "trace.jsonl"
    proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress"],
                            env={**env, trace.ENV: str(path)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started: dict[int, str] = {}
    names: list[str] = []
    try:
        for event in trace.follow(path, lambda: proc.poll() is None):
            if event["event"] == trace.COMMITTED:  # generating
                started = tree(proc.pid)
                names = [cmdline(pid) for pid in started]  # before the guardian reaps them
                os.kill(proc.pid, signal.SIGKILL)  # the process only, as `kill -9` does
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sum("VLLM::Worker" in c for c in names) == 2, names  # TP=2: two workers
    assert any("EngineCore" in c for c in names) and any("uvicorn" in c for c in names), names
    left = left_alive(started, 10)
    assert not left, f"outlived the killed run: {left}"

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "data", columns=["row_index", "status"])
    assert sorted(rows.column("row_index").to_pylist()) == list(range(n))
    assert set(rows.column("status").to_pylist()) == {"ok"}
