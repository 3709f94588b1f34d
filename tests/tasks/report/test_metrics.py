"""Live metrics (tasks/report/metrics.py) without an engine: the pipeline's hooks move the run's
counters (replay engine, real Parquet, real tools), the endpoint serves them over HTTP
beside prometheus_client's default registry and closes with the run, and the port check
refuses a port in use. tests/flows/test_metrics.py scrapes a real vLLM run."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, Counter
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.tasks.rows import test_pipeline as single
from tests.tasks.rows import test_conversation as rollouts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.job_file import JobFileError
from thinkbatch.tasks.report import metrics
from thinkbatch.tasks.report.metrics import RunMetrics
from thinkbatch.tasks.report.progress import Progress
from thinkbatch.tasks.store.fingerprint import fingerprint_parts


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return samples(resp.read().decode())


def own(run: RunMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in run.registry.collect() for s in family.samples}


def _with_port(job: JobSpec, port: int) -> JobSpec:
    return job.model_copy(update={"observability": job.observability.model_copy(
        update={"metrics_port": port, "metrics_host": "127.0.0.1"})})


def test_the_pipeline_counts_rows_by_status_tokens_commits_and_shards(tmp_path: Path) -> None:
    """12 rows in 3 shards, two of which the engine gives up on; a part every 5 rows."""
    job = single._job(tmp_path, single._rows(12), rows_per_shard=4, flush_rows=5)
    layout, plan = single._plan(job)
    run = RunMetrics(job, shards_total=len(plan.shards), shards_done=0)
    engine = single.ScriptedReplay(job, finish={1: "abort", 7: "error"})
    pipe = single._pipeline(job, layout, plan, engine, live=run)

    single._run(pipe, 0, 1, 2)

    got = own(run)
    assert got[("thinkbatch_rows_total", (("status", "ok"),))] == 10
    assert got[("thinkbatch_rows_total", (("status", "engine_error"),))] == 2
    assert got[("thinkbatch_rows_total", (("status", "parse_error"),))] == 0  # from zero
    assert got[("thinkbatch_rows_committed_total", ())] == 12
    assert got[("thinkbatch_output_tokens_total", ())] == 0  # replay generates no tokens
    assert (got[("thinkbatch_shards_total", ())], got[("thinkbatch_shards_done", ())],
            got[("thinkbatch_shards_completed_total", ())]) == (3, 3, 3)
    assert got[("thinkbatch_rows_in_flight", ())] == 0
    assert got[("thinkbatch_run_info", (("job_name", "thinkbatch"), ("model", ""),
                                        ("output", job.output.path), ("worker", "0")))] == 1
    assert not any(name.startswith("thinkbatch_tool") for name, _ in got)  # no rollout


def test_tool_calls_and_errors_count_as_their_results_return(tmp_path: Path) -> None:
    """Row 0 calls a tool that answers, then one that raises, then answers; row 1 answers."""
    job = rollouts._job(tmp_path, 2)
    engine = rollouts.Script(job, {
        0: [rollouts.call(("get_weather", {"city": "Vienna"})),
            rollouts.call(("explode", {}), ("get_weather", {"city": "Graz"})),
            rollouts.answer("done")],
        1: [rollouts.answer("at once")]})
    run = RunMetrics(job, shards_total=1, shards_done=0)

    pipe, _ = rollouts._pipeline(job, engine, live=run)
    pipe.submit_shard(0).result(timeout=rollouts.WAIT_S)
    pipe.close()

    got = own(run)
    assert got[("thinkbatch_tool_calls_total", ())] == 3
    assert got[("thinkbatch_tool_errors_total", ())] == 1
    assert got[("thinkbatch_rows_total", (("status", "ok"),))] == 2


def test_rows_per_second_is_measured_over_the_last_minute(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    rows = [0]
    rate = metrics._Rate(lambda: rows[0])

    clock[0], rows[0] = 1010.0, 50
    assert rate() == 5.0  # since the start
    clock[0], rows[0] = 1050.0, 250
    assert rate() == 5.0
    clock[0], rows[0] = 1100.0, 250  # from the last scrape at least a minute old (1010)
    assert rate() == 200 / 90
    clock[0], rows[0] = 1200.0, 1250
    assert rate() == 10.0  # 1100 -> 1200
    clock[0] = 1300.0  # stalled since the last scrape, a minute or more ago
    assert rate() == 0.0


def test_the_endpoint_serves_ours_and_the_default_registry_and_closes_with_the_run(
        tmp_path: Path) -> None:
    """The default registry is where vLLM's PrometheusStatLogger registers `vllm:`
    metrics; one registered there after the server started is served too. After the
    block the port is closed and free: a second run binds it again."""
    job = single._job(tmp_path, single._rows(4), rows_per_shard=2)
    layout, plan = single._plan(job)
    port = free_port()
    job = _with_port(job, port)
    engine_metric = None
    try:
        for attempt in range(2):
            with metrics.serving(job, layout, plan) as run:
                assert run is not None
                if engine_metric is None:
                    engine_metric = Counter("vllm:test_generation_tokens", "A stand-in.")
                engine_metric.inc(7)
                progress = Progress(total=4, already_done=0, enabled=False)
                run.follow(progress.tally, lambda: 0)
                progress.row_done({"status": "ok", "prompt_tokens": 3, "completion_tokens": 12,
                                   "reasoning_tokens": 0, "finish_reason": "stop",
                                   "ttft_s": 0.1, "latency_s": 0.5})
                got = scrape(port)
                assert got[("thinkbatch_rows_total", (("status", "ok"),))] == 1  # fresh
                assert got[("thinkbatch_output_tokens_total", ())] == 12
                assert got[("thinkbatch_shards_total", ())] == 2
                assert got[("vllm:test_generation_tokens_total", ())] == 7 * (attempt + 1)
                assert ("process_cpu_seconds_total", ()) in got
            with pytest.raises(OSError):
                scrape(port)
            assert not [t for t in threading.enumerate() if t.name == "thinkbatch-metrics"]
    finally:
        if engine_metric is not None:
            REGISTRY.unregister(engine_metric)


def test_a_worker_serves_on_the_port_plus_its_index(tmp_path: Path) -> None:
    job = single._job(tmp_path, single._rows(2))
    layout, plan = single._plan(job)
    port = free_port()
    with metrics.serving(_with_port(job, port - 1), layout, plan, worker_index=1):
        assert ("thinkbatch_shards_total", ()) in scrape(port)


def test_no_port_serves_nothing(tmp_path: Path) -> None:
    job = single._job(tmp_path, single._rows(2))
    with metrics.serving(job, *single._plan(job)) as run:
        assert run is None
        assert not [t for t in threading.enumerate() if t.name == "thinkbatch-metrics"]


def test_the_port_check_refuses_a_port_in_use_and_a_bad_host(tmp_path: Path) -> None:
    job = single._job(tmp_path, single._rows(2))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert metrics.check_metrics_port(_with_port(job, port)) == [
            f"observability.metrics_port: 127.0.0.1:{port} is in use"]
    assert metrics.check_metrics_port(_with_port(job, port)) == []
    bad = job.model_copy(update={"observability": job.observability.model_copy(
        update={"metrics_port": port, "metrics_host": "no-such-host.invalid"})})
    [error] = metrics.check_metrics_port(bad)
    assert error.startswith("observability.metrics_host: 'no-such-host.invalid'")


@pytest.mark.parametrize("value, message", [
    (0, "greater than or equal to 1"), (70000, "less than or equal to 65535"),
    ("http", "valid integer")])
def test_a_bad_port_value_is_refused_by_the_schema(tmp_path: Path, value, message) -> None:
    with pytest.raises(JobFileError, match=message):
        load_job(inline={"input": {"path": str(tmp_path)}, "engine": {"kind": "replay"},
                         "output": {"path": str(tmp_path / "out")},
                         "observability": {"metrics_port": value}})


def test_the_last_worker_port_must_exist(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="worker 3 would serve on port 65538"):
        load_job(inline={"input": {"path": str(tmp_path)}, "engine": {"kind": "replay"},
                         "output": {"path": str(tmp_path / "out")},
                         "scale": {"workers": 4, "shared_filesystem": True},
                         "observability": {"metrics_port": 65535}})


def test_watching_a_run_is_not_part_of_its_fingerprint(tmp_path: Path) -> None:
    job = single._job(tmp_path, single._rows(2))
    assert fingerprint_parts(_with_port(job, 9400), []) == fingerprint_parts(job, [])
    assert not any(k.startswith("observability") for k in fingerprint_parts(job, []))

