"""Stops by signal as users send them to `thinkbatch run` (a subprocess): SIGTERM to the
process (a kill, Prefect's cancellation, Kubernetes' eviction) and SIGINT to its process
group (Ctrl-C in a terminal). The run commits what it generated, releases its lease and
claims, exits 75 with one line and no traceback; running it again finishes the job with
every row once, redoing only rows that were in flight."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import (CLI, ENGINE_IN_PROCESS, engine_section, job_dict, prompt_rows,
                            write_job, write_prompts)
from thinkbatch.tasks.report import trace

STOPPED = re.compile(r"^thinkbatch: stopped by (SIG\w+); (\d+) rows committed, "
                     r"rerun the same command to resume$")


def _signal_after_first_commit(job: Path, sig: signal.Signals,
                               group: bool) -> tuple[int, str, set[int], float]:
    """Run the job, send `sig` right after its first commit (its trace tells); returns
    the exit code, the output, the rows submitted to the engine and the seconds from
    signal to exit."""
    path, log = job.with_suffix(".trace.jsonl"), job.with_suffix(".log")
    with log.open("w") as output:
        proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress"],
                                env={**os.environ, trace.ENV: str(path)}, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sent = 0.0
    try:
        for event in trace.follow(path, lambda: proc.poll() is None):
            if event["event"] == trace.COMMITTED:
                (os.killpg if group else os.kill)(proc.pid, sig)
                sent = time.monotonic()
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - sent
    assert sent, "the run ended before its first commit"
    submitted = {e["row"] for e in trace.read(path) if e["event"] == trace.SUBMITTED}
    return proc.returncode, log.read_text(), submitted, took


def _row_indices(parts: set[Path]) -> list[int]:
    return [i for p in sorted(parts)
            for i in pq.read_table(p, columns=["row_index"]).column(0).to_pylist()]


def _check_stop_then_resume(job: Path, out: Path, n: int, rc: int, output: str,
                            submitted: set[int], sig: str, in_flight: int) -> None:
    assert rc == 75, output[-3000:]
    assert "Traceback" not in output and "ConnectError" not in output, output[-5000:]
    m = next(filter(None, map(STOPPED.match, output.splitlines())), None)
    assert m and m.group(1) == sig, output[-2000:]
    first = set((out / "data").glob("*.parquet"))
    committed = _row_indices(first)
    assert int(m.group(2)) == len(committed) and 0 < len(committed) < n
    assert not (out / "_lease.json").exists() and not list((out / "_claims").glob("*.json"))

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, **ENGINE_IN_PROCESS})
    assert r.returncode == 0, r.stderr[-3000:]
    second = _row_indices(set((out / "data").glob("*.parquet")) - first)
    assert sorted(committed + second) == list(range(n))  # every row, exactly once
    regenerated = submitted & set(second)
    assert len(regenerated) <= in_flight, (len(regenerated), len(submitted), len(committed))


def test_sigterm_commits_what_finished_exits_75_and_a_rerun_resumes(tmp_path: Path,
                                                                   tiny_model: str) -> None:
    """Replay engine (fast): the host path is the same as with vLLM."""
    n, in_flight = 5000, 64
    rows = prompt_rows(n)
    for i, r in enumerate(rows):
        r["raw_text"] = f"<think>thinking {i}</think>answer {i}"
    write_prompts(tmp_path / "in.parquet", rows, row_group_size=500)
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        {"kind": "replay", "tokenizer": tiny_model, "max_in_flight": in_flight},
        sampling={"structured_outputs": None}, shards={"rows_per_shard": 500},
        output={"flush_rows": 64}))
    rc, output, submitted, _ = _signal_after_first_commit(job, signal.SIGTERM, group=False)
    _check_stop_then_resume(job, tmp_path / "out", n, rc, output, submitted, "SIGTERM",
                            in_flight)


@pytest.mark.engine
def test_ctrl_c_stops_the_real_engine_within_a_minute_without_connect_errors(
        tmp_path: Path, tiny_model: str) -> None:
    """SIGINT reaches the whole process group: thinkbatch, vLLM's engine core and worker.
    The engine must not die under the stop, nor Prefect's temporary server before it."""
    n, in_flight = 160, 16
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(tiny_model, max_in_flight=in_flight),
        output={"flush_rows": 16}, shards={"rows_per_shard": 40}))
    rc, output, submitted, took = _signal_after_first_commit(job, signal.SIGINT, group=True)
    assert took < 60, took
    assert "engine_error" not in output and "EngineDeadError" not in output
    _check_stop_then_resume(job, tmp_path / "out", n, rc, output, submitted, "SIGINT",
                            in_flight)
