"""Live metrics of a real run: the flow in-process on the real vLLM engine (CPU build,
random-weight miniature), scraped over HTTP on 127.0.0.1 while rows commit (the run's
trace, tasks/report/trace.py, says when), then closed with the run; a second run in the same
process serves on the same port with fresh counters. A port the job cannot have is
refused by `thinkbatch run` before any model loads."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (CLI, engine_section, free_port, job_dict, prompt_rows, write_job,
                            write_prompts)
from tests.tasks.report.test_metrics import scrape
from thinkbatch.flows.job import generate_dataset
from thinkbatch.tasks.report import trace
from thinkbatch.tasks.rows.engine import close_engines

pytestmark = pytest.mark.engine

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _job(root: Path, model: str, rows: int, port: int) -> dict[str, Any]:
    """Eight requests in the engine at once and a part every eight rows: many commits,
    each well before the run's end. The engine is the one the other in-process engine
    tests share (max_in_flight is the pipeline's, not vLLM's)."""
    write_prompts(root / "in.parquet", prompt_rows(rows))
    return job_dict(root / "in.parquet", root / "out", engine_section(model, max_in_flight=8),
                    shards={"rows_per_shard": 40}, output={"flush_rows": 8},
                    observability={"metrics_port": port, "metrics_host": "127.0.0.1"})


def _run_and_scrape(job: dict[str, Any], port: int, trace_file: Path, at_commits: set[int],
                    monkeypatch: pytest.MonkeyPatch) -> tuple[list[Scrape], Any]:
    """Run the job in this thread; scrape the endpoint from another right after each of
    the commits numbered in `at_commits` (1 = the first part)."""
    monkeypatch.setenv(trace.ENV, str(trace_file))
    scrapes: list[Scrape] = []
    errors: list[BaseException] = []
    finished = threading.Event()

    def watch() -> None:
        commits = 0
        for event in trace.follow(trace_file, lambda: not finished.is_set()):
            if event["event"] == trace.COMMITTED:
                commits += 1
                if commits in at_commits:
                    try:
                        scrapes.append(scrape(port))
                    except BaseException as e:
                        errors.append(e)

    watcher = threading.Thread(target=watch, name="test-scraper")
    watcher.start()
    try:
        manifest = generate_dataset(job)
    finally:
        finished.set()
        watcher.join(timeout=30)
    assert not errors, errors
    return scrapes, manifest


def _total(got: Scrape, name: str) -> float:
    return sum(v for (n, _), v in got.items() if n == name)


def test_a_run_is_scraped_while_it_commits_and_its_port_closes_with_it(
        tiny_model: str, prefect_harness, tmp_path: Path, monkeypatch) -> None:
    # The registry holds the vLLM collectors of the engine loaded last in this process; this
    # test process may keep another engine (another tokenizer's) loaded after the shared one.
    close_engines()
    port = free_port()

    scrapes, manifest = _run_and_scrape(_job(tmp_path / "a", tiny_model, 120, port), port,
                                        tmp_path / "a.trace", {1, 6}, monkeypatch)

    assert manifest.rows == 120
    first, later = scrapes
    assert first[("thinkbatch_shards_total", ())] == later[("thinkbatch_shards_total", ())] == 3
    # Our counters move while the run commits.
    assert _total(later, "thinkbatch_rows_committed_total") >= 40  # 5 parts of 8 at least
    assert (_total(later, "thinkbatch_rows_committed_total")
            > _total(first, "thinkbatch_rows_committed_total"))
    ok = ("thinkbatch_rows_total", (("status", "ok"),))
    assert later[ok] > first[ok] > 0
    assert (_total(later, "thinkbatch_output_tokens_total")
            > _total(first, "thinkbatch_output_tokens_total") > 0)
    assert 0 < first[("thinkbatch_rows_in_flight", ())] <= 8
    assert ("thinkbatch_rows_per_second", ()) in later
    # vLLM's own, recorded by the offline engine's PrometheusStatLogger in this process.
    for name in ("vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count"):
        assert _total(later, name) > _total(first, name) > 0, name
    assert ("vllm:num_requests_running", (("engine", "0"), ("model_name", tiny_model))) in later
    kv = [v for (n, _), v in later.items() if n == "vllm:kv_cache_usage_perc"]
    assert kv and all(0 <= v <= 1 for v in kv), kv
    # After the run: nothing listens on the port, no server thread is left.
    with pytest.raises(OSError):
        scrape(port)
    assert not [t for t in threading.enumerate() if t.name == "thinkbatch-metrics"]

    # A second run in the same process binds the same port, with counters of its own.
    scrapes, manifest = _run_and_scrape(_job(tmp_path / "b", tiny_model, 40, port), port,
                                        tmp_path / "b.trace", {1}, monkeypatch)
    (second,) = scrapes
    assert manifest.rows == 40
    assert second[("thinkbatch_shards_total", ())] == 1
    assert _total(second, "thinkbatch_rows_total") <= 40  # not the first run's 120 and more
    # vLLM's counters belong to the engine, which the process keeps across runs.
    assert (_total(second, "vllm:request_success_total")
            > _total(later, "vllm:request_success_total"))
    with pytest.raises(OSError):
        scrape(port)


@pytest.mark.parametrize("problem", ["in use", "not a port"])
def test_a_port_the_job_cannot_have_is_refused_before_the_model_loads(
        tiny_model: str, tmp_path: Path, problem: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        job = _job(tmp_path, tiny_model, 8, port if problem == "in use" else 70000)
        r = subprocess.run([*CLI, "run", str(write_job(tmp_path / "job.yaml", job)),
                            "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    expected = (f"observability.metrics_port: 127.0.0.1:{port} is in use" if problem == "in use"
                else "observability.metrics_port")
    assert expected in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
