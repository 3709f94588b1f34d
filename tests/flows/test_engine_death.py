"""The engine's core process dies mid-run (the OOM killer, a GPU fault): the worker loads
a new engine and resubmits the rows in flight; none of them is written as an engine error.
A row that kills the engine each time it runs is found and written as one; an engine that
every request kills stops the job. Each message names the cause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import engine_poison
from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_job, write_prompts
from tests.processes import cmdline, tree
from thinkbatch.flows.job import generate_dataset

pytestmark = pytest.mark.engine


def _engine_core(pid: int) -> int | None:
    return next((p for p in tree(pid) if "EngineCore" in cmdline(p)), None)  # its title


def test_engine_core_killed_mid_run_is_replaced_and_no_row_fails(tmp_path: Path,
                                                                 tiny_model: str) -> None:
    n = 150
    write_prompts(tmp_path / "in.parquet", prompt_rows(n))
    job = write_job(tmp_path / "job.yaml", job_dict(
        tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model, max_in_flight=16),
        output={"flush_rows": 16}, shards={"rows_per_shard": 50}))
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
    died = [line for line in err.splitlines() if "the engine died" in line]
    assert len(died) == 1 and "the engine died (the engine core process was killed by " \
        "SIGKILL)" in died[0], died
    table = pq.read_table(data, columns=["row_index", "status"])
    assert sorted(table.column("row_index").to_pylist()) == list(range(n))  # each row once
    assert set(table.column("status").to_pylist()) == {"ok"}  # none an engine error
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["this_run"]["engine_restarts"] == 1
    assert manifest["status_counts"] == {"ok": n}


def _poisoned_job(tmp_path: Path, model: str, poisoned: set[int], rows: int,
                  max_in_flight: int) -> dict:
    """Rows whose sampling override flags them for the test's logits processor, which
    raises in the engine core when such a request enters the batch."""
    data = prompt_rows(rows)
    for i, row in enumerate(data):
        row["sampling"] = engine_poison.ROW_SAMPLING if i in poisoned else None
    write_prompts(tmp_path / "in.parquet", data)
    engine = engine_section(model, max_in_flight=max_in_flight)
    engine["logits_processors"] = [engine_poison.PATH]
    return job_dict(tmp_path / "in.parquet", tmp_path / "out", engine,
                    input={"sampling_column": "sampling"})


def test_a_row_that_kills_the_engine_is_found_and_written_as_an_engine_error(
        tmp_path: Path, tiny_model: str, prefect_harness, own_engines) -> None:
    """Today: resubmitted with the rows beside it until `engine.max_restarts` ran out, and
    the job failed, promising that a rerun (which dies the same way) resumes them."""
    manifest = generate_dataset(_poisoned_job(tmp_path, tiny_model, {3}, rows=6, max_in_flight=2))

    assert manifest.status_counts == {"engine_error": 1, "ok": 5}
    rows = {r["row_index"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert sorted(rows) == list(range(6))
    assert rows[3]["status"] == "engine_error"
    assert rows[3]["error"] == ("the engine died each time it ran this request, alone too: "
                                f"RuntimeError: {engine_poison.MESSAGE}")
    assert 2 <= manifest.this_run.engine_restarts <= 3  # once as it was, then halves


def test_an_engine_that_every_request_kills_stops_the_job_naming_the_cause(
        tmp_path: Path, tiny_model: str) -> None:
    job = write_job(tmp_path / "job.yaml",
                    _poisoned_job(tmp_path, tiny_model, set(range(3)), rows=3, max_in_flight=1))
    done = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    [last] = [line for line in done.stderr.splitlines()
              if line.startswith("thinkbatch: job failed")]
    assert last.startswith(f"thinkbatch: job failed: EngineDied: the engine died 3 times "
                           f"(RuntimeError: {engine_poison.MESSAGE}): running request 0:0"), last
    assert "every request seems to kill it" in last
    assert last.count(engine_poison.MESSAGE) == 1
    assert "resumes them" not in last
