"""The engine's core process dies mid-run (the OOM killer, a GPU fault): the worker loads
a new engine and resubmits the rows in flight; none of them is written as an engine error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_job, write_prompts
from tests.processes import cmdline, tree

pytestmark = pytest.mark.engine


def _engine_core(pid: int) -> int | None:
    return next((p for p in tree(pid) if "EngineCore" in cmdline(p)), None)  # its title


def test_engine_core_killed_mid_run_is_replaced_and_no_row_fails(tmp_path: Path,
                                                                 tiny_model: str) -> None:
    n = 300
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model, max_in_flight=16),
        output={"flush_rows": 16}, shards={"rows_per_shard": 100}))
    proc = subprocess.Popen([*CLI, "run", str(job), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    data = tmp_path / "out" / "data"
    try:
        deadline = time.monotonic() + 300
        while not list(data.glob("*.parquet")):  # generating: a part is committed
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        core = _engine_core(proc.pid)
        assert core is not None
        os.kill(core, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "the engine died" in err
    table = pq.read_table(data, columns=["row_index", "status"])
    assert sorted(table.column("row_index").to_pylist()) == list(range(n))  # each row once
    assert set(table.column("status").to_pylist()) == {"ok"}  # none an engine error
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["this_run"]["engine_restarts"] == 1
    assert manifest["status_counts"] == {"ok": n}
