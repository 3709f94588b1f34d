"""A SIGKILLed `thinkbatch run` takes every process it started with it: vLLM's engine core,
its tensor-parallel workers, Prefect's temporary server, multiprocessing's resource
tracker. Run again, it resumes: every row exactly once, and little generated twice. Run with
TP=2 on vLLM's CPU build, which also shows that thinkbatch binds the ranks' threads itself
(VLLM_CPU_OMP_THREADS_BIND unset) and that TP=2 runs end to end, its engine's load shown
at the default log level."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_job, write_prompts
from tests.processes import cmdline, left_alive, tree
from thinkbatch.tasks.report import trace

pytestmark = pytest.mark.engine

IN_FLIGHT, FLUSH = 16, 16


def _rows_of(parts: list[Path]) -> list[int]:
    return [i for p in parts for i in pq.read_table(p, columns=["row_index"]).column(0).to_pylist()]


def test_a_sigkilled_run_leaves_no_process_behind_then_tp2_finishes(
        tmp_path: Path, tiny_model: str) -> None:
    n = 100
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(tiny_model, tensor_parallel_size=2, max_in_flight=IN_FLIGHT),
        output={"flush_rows": FLUSH}, shards={"rows_per_shard": 50}))
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
    left = left_alive(started, 30)
    assert not left, f"outlived the killed run: {left}"
    data = tmp_path / "out" / "data"
    first_parts = set(data.glob("*.parquet"))
    committed = _rows_of(sorted(first_parts))
    assert 0 < len(committed) < n
    assert not (tmp_path / "out" / "_manifest.json").exists()
    submitted = {e["row"] for e in trace.read(path) if e["event"] == trace.SUBMITTED}

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # The load shows at the default log level, from the engine's own processes (engine
    # core, the TP workers): its steps (one start per rank) and the KV cache size in
    # tokens, in thinkbatch's format, and no other INFO line.
    loaded = [line.split("] ", 1)[1] for line in r.stderr.splitlines()
              if re.match(r"INFO [\d:]+ \[vllm\] ", line)]
    steps = ["Starting to load model", "Starting to load model", "CPU KV cache size: ",
             "init engine ("]
    assert len(loaded) == len(steps) and all(
        line.startswith(step) for line, step in zip(loaded, steps)), r.stderr[-3000:]
    assert re.match(r"CPU KV cache size: [\d,]+ tokens", loaded[2]), loaded
    second = _rows_of(sorted(set(data.glob("*.parquet")) - first_parts))
    assert sorted(committed + second) == list(range(n))  # every row, exactly once
    assert set(pq.read_table(data, columns=["status"]).column(0).to_pylist()) == {"ok"}
    regenerated = submitted & set(second)
    assert len(regenerated) < IN_FLIGHT + FLUSH, (len(regenerated), len(submitted))
    assert not list(data.glob(".*.tmp"))
