"""SIGKILL a real `thinkbatch run` after its first commit, run it again, and check
that every row is there exactly once and that little was generated twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_job, write_prompts

pytestmark = pytest.mark.engine

IN_FLIGHT, FLUSH = 16, 16
SUBMITTED = re.compile(r"submitted row (\d+)")


def _rows_of(parts: list[Path]) -> list[int]:
    return [i for p in parts for i in pq.read_table(p, columns=["row_index"]).column(0).to_pylist()]


def test_kill_after_first_commit_then_resume(tmp_path: Path, tiny_model: str) -> None:
    n = 400
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(tiny_model, max_in_flight=IN_FLIGHT),
        output={"flush_rows": FLUSH}, shards={"rows_per_shard": 100}))
    env = {**os.environ, "THINKBATCH_LOG_LEVEL": "DEBUG"}
    proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    submitted: set[int] = set()
    try:
        for line in proc.stderr:
            if m := SUBMITTED.search(line):
                submitted.add(int(m.group(1)))
            if "committed" in line and "rows of shard" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    submitted.update(int(m.group(1)) for m in SUBMITTED.finditer(proc.stderr.read()))
    assert proc.returncode == -signal.SIGKILL
    data = tmp_path / "out" / "data"
    first_parts = set(data.glob("*.parquet"))
    committed = _rows_of(sorted(first_parts))
    assert 0 < len(committed) < n
    assert not (tmp_path / "out" / "_manifest.json").exists()

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    second = _rows_of(sorted(set(data.glob("*.parquet")) - first_parts))
    everything = committed + second
    assert sorted(everything) == list(range(n))  # every row, exactly once
    statuses = pq.read_table(data, columns=["status"]).column(0).to_pylist()
    assert set(statuses) == {"ok"}
    regenerated = submitted & set(second)
    assert len(regenerated) < IN_FLIGHT + FLUSH, (len(regenerated), len(submitted))
    assert not list(data.glob(".*.tmp"))
