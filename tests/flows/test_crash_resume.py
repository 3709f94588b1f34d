"""SIGKILL a real `thinkbatch run` after its first commit, run it again, and check
that every row is there exactly once and that little was generated twice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import (CLI, engine_section, job_dict, kill_after_first_commit, prompt_rows,
                            write_job, write_prompts)

pytestmark = pytest.mark.engine

IN_FLIGHT, FLUSH = 16, 16


def _rows_of(parts: list[Path]) -> list[int]:
    return [i for p in parts for i in pq.read_table(p, columns=["row_index"]).column(0).to_pylist()]


def test_kill_after_first_commit_then_resume(tmp_path: Path, tiny_model: str) -> None:
    n = 400
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out",
        engine_section(tiny_model, max_in_flight=IN_FLIGHT),
        output={"flush_rows": FLUSH}, shards={"rows_per_shard": 100}))
    submitted = kill_after_first_commit(job)
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
