"""Live Prometheus metrics of a run, for the Grafana a GPU team already runs: vLLM's engine
metrics and thinkbatch's own, on `observability.metrics_port` for as long as a worker runs.

vLLM's offline engine records its metrics in this process. The V1 `LLMEngine` that
`vllm.LLM` wraps keeps a `StatLoggerManager` whenever stats are on (tasks/rows/engine.py turns
`disable_log_stats` off for first-token times); it always includes a
`PrometheusStatLogger`, which registers every `vllm:` metric in prometheus_client's
default REGISTRY and updates it from the SchedulerStats that the engine core process sends
with each step's outputs. So the engine core, though it runs in another process, records
nothing itself, and no PROMETHEUS_MULTIPROC_DIR is needed (`vllm serve` needs one only
for several API server processes). A restarted engine's logger replaces the old one's
collectors in that registry, so the endpoint follows it: it shows the engine loaded last
in the process (a worker keeps one).

The endpoint serves that registry (vLLM's metrics and prometheus_client's process and
Python collectors) beside the run's own registry, made fresh for each run: a second run
in the same process starts its counters at zero and registers nothing twice. A scale-out
worker serves on `metrics_port + worker_index`: workers are separate processes, often
several on one node, and one port each keeps a scrape target per worker.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.plan import Plan
from thinkbatch.schemas.record import ToolResult
from thinkbatch.tasks.report.figures import RunTally
from thinkbatch.tasks.rows.listeners import Listener
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout

log = logging.getLogger("thinkbatch.metrics")

RATE_WINDOW_S = 60.0  # rows/s is measured over about the last minute


class _Rate:
    """Rows per second since the latest scrape at least RATE_WINDOW_S old (or since the
    run started), from the row count seen at each scrape: nothing is sampled between
    scrapes, and a run that stalls falls to zero within a minute of scrapes."""

    def __init__(self, count: Callable[[], int]):
        self._count = count
        self._lock = threading.Lock()
        self._seen: deque[tuple[float, int]] = deque([(time.monotonic(), count())])

    def __call__(self) -> float:
        now, rows = time.monotonic(), self._count()
        with self._lock:
            self._seen.append((now, rows))
            while len(self._seen) > 2 and self._seen[1][0] <= now - RATE_WINDOW_S:
                self._seen.popleft()
            since, before = self._seen[0]
        return (rows - before) / (now - since) if now > since else 0.0


class RunMetrics(Listener):
    """This run's figures as Prometheus metrics, read by scrapes: rows by status and
    output tokens from the run's tally (`follow`), never counted twice; parts committed,
    shards done and tool results as the pipeline tells its listeners (its writer and
    driver threads)."""

    def __init__(self, job: JobSpec, shards_total: int, shards_done: int, worker: int = 0):
        self.registry = CollectorRegistry()
        reg = self.registry
        Info("thinkbatch_run", "The job this process runs.", registry=reg).info({
            "job_name": job.name, "model": job.engine.model or "", "output": job.output.path,
            "worker": str(worker)})
        self._tally: RunTally | None = None  # until the pipeline opens
        reg.register(_TallyCollector(self))
        self._committed = Counter("thinkbatch_rows_committed", "Rows this process committed "
                                  "in parts (a retry's copied rows too).", registry=reg)
        Gauge("thinkbatch_rows_per_second", "Rows finished per second over about the last "
              "minute.", registry=reg).set_function(_Rate(lambda: sum(self.statuses().values())))
        self._in_flight = Gauge("thinkbatch_rows_in_flight", "Rows in the engine (in a "
                                "rollout: conversations generating a turn).", registry=reg)
        Gauge("thinkbatch_shards_total", "Shards in the job's plan.",
              registry=reg).set(shards_total)
        self._shards_done = Gauge("thinkbatch_shards_done", "Shards done in the output as "
                                  "this process knows: when it started, plus its own.",
                                  registry=reg)
        self._shards_done.set(shards_done)
        self._shards_completed = Counter("thinkbatch_shards_completed", "Shards this "
                                         "process completed (sum over workers).", registry=reg)
        self._tool_calls: Counter | None = None
        self._tool_errors: Counter | None = None
        if job.rollout is not None:
            self._tool_calls = Counter("thinkbatch_tool_calls", "Tool calls run for "
                                       "rollouts, counted as their results return.",
                                       registry=reg)
            self._tool_errors = Counter("thinkbatch_tool_errors", "Tool calls that failed "
                                        "(answered with their error text).", registry=reg)

    def follow(self, tally: RunTally, in_flight: Callable[[], int]) -> None:
        """The run's tally of finished rows and the pipeline's count of rows in flight,
        read at each scrape."""
        self._tally = tally
        self._in_flight.set_function(in_flight)

    def statuses(self) -> dict[str, int]:
        """Rows finished by status so far (a copy: the driver thread adds rows meanwhile)."""
        return dict(self._tally.status) if self._tally is not None else {}

    def output_tokens(self) -> int:
        return self._tally.completion_tokens if self._tally is not None else 0

    def committed(self, shard_id: int, rows: int) -> None:
        self._committed.inc(rows)

    def shard_done(self, shard_id: int, stats: ShardStats) -> None:
        self._shards_done.inc()
        self._shards_completed.inc()

    def tools_returned(self, results: Sequence[ToolResult]) -> None:
        if self._tool_calls is None or self._tool_errors is None:
            return
        self._tool_calls.inc(len(results))
        self._tool_errors.inc(sum(r.error is not None for r in results))


class _TallyCollector(Collector):
    """Rows by status (every status from zero, so rate() sees the first one) and output
    tokens, as counters read from the tally at each scrape."""

    def __init__(self, metrics: RunMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self._metrics.statuses()
        rows = CounterMetricFamily("thinkbatch_rows", "Rows (samples) this process finished, "
                                   "by status: generated, parsed and handed to the committer.",
                                   labels=["status"])
        for status in Status:
            rows.add_metric([status.value], counts.get(status.value, 0))
        yield rows
        yield CounterMetricFamily("thinkbatch_output_tokens", "Completion tokens of the rows "
                                  "this process finished.", value=self._metrics.output_tokens())


class MetricsServer:
    """An HTTP endpoint (`/metrics`, any path) on a thread of its own, closed with the run:
    the port is released at once, free for the next run."""

    def __init__(self, host: str, port: int, metrics: RunMetrics):
        # Registries collected whole at each scrape: the default one is where vLLM keeps
        # its metrics, an engine loaded or restarted after the server started included.
        served = CollectorRegistry()
        served.register(REGISTRY)
        served.register(metrics.registry)
        self._httpd, self._thread = start_http_server(port, host, served)
        self._thread.name = "thinkbatch-metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def port_for(job: JobSpec, worker_index: int) -> int | None:
    port = job.observability.metrics_port
    return None if port is None else port + worker_index


@contextmanager
def serving(job: JobSpec, layout: OutputLayout, plan: Plan,
            worker_index: int = 0) -> Iterator[RunMetrics | None]:
    """The run's metrics, served on the job's port for the block's length (before the
    engine loads, so a long load shows as a target that is up); None without a port."""
    port = port_for(job, worker_index)
    if port is None:
        yield None
        return
    metrics = RunMetrics(job, len(plan.shards), len(checkpoint.done_shards(layout)),
                         worker_index)
    server = MetricsServer(job.observability.metrics_host, port, metrics)
    log.info("metrics on http://%s:%d/metrics", job.observability.metrics_host, port)
    try:
        yield metrics
    finally:
        server.close()


def check_metrics_port(job: JobSpec) -> list[str]:
    """The port is free on this machine (bound and released at once), so a port another
    process holds refuses the job before any model loads. A scale-out job's workers bind
    on their own nodes: not checked here."""
    port = port_for(job, 0)
    if port is None or job.scale.workers > 1:
        return []
    host = job.observability.metrics_host
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            s.bind((host, port))
    except socket.gaierror as e:
        return [f"observability.metrics_host: {host!r} is not an address: {e}"]
    except OSError as e:
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        return [f"observability.metrics_port: {host}:{port} {why}"]
    return []
