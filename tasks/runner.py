"""The front door of a run, free of Prefect: check the job once, plan it, open the pipeline,
work shards until none are left, finalize.

flows/ wraps these in Prefect's flows and tasks (flows/job.py, flows/worker.py) and adds
only what Prefect has: artifacts, events, deployments, the per-shard task. Tests and
benchmarks call them directly and copy nothing.

A job is checked and planned once per run. The CLI `prepare`s it (every check, the plan
made) and refuses a held output or a changed resume before any flow starts; the flow it
then runs in this process `take`s that prepared job instead of checking and planning
again, as the run takes the tools the checks opened (tools/kept.py). A deployment run
arrives unchecked and prepares itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import Manifest, RunFigures, ShardStats
from thinkbatch.schemas.output import output_schema
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.jobs import validate
from thinkbatch.tasks.jobs.retry import Carry, manifest_section
from thinkbatch.tasks.process.stop import Stopped, StopSignals
from thinkbatch.tasks.report import html_report, metrics
from thinkbatch.tasks.report.figures import RunTally, with_rates
from thinkbatch.tasks.report.manifest import build_manifest
from thinkbatch.tasks.report.progress import Progress
from thinkbatch.tasks.report.trace import Trace
from thinkbatch.tasks.rows.engine import Engine, get_engine, restart_engine
from thinkbatch.tasks.rows.engine_settings import may_seed
from thinkbatch.tasks.rows.listeners import Listener, Listeners
from thinkbatch.tasks.rows.parse import OutputParser
from thinkbatch.tasks.rows.pipeline import Pipeline
from thinkbatch.tasks.rows.read import input_schema
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.claims import ShardClaims
from thinkbatch.tasks.store.commit import FencedOut
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.lease import refuse_if_held
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage
from thinkbatch.tasks.tools import kept

MAX_OPEN_SHARDS = 64  # claims a worker holds at most (each is renewed every TTL/4)
IDLE_POLL_S = 2.0  # a worker that found nothing to claim looks again after this,
IDLE_POLL_MAX_S = 60.0  # doubling up to this while it keeps finding nothing
STOP_CHECK_S = 0.5  # how soon a recorded stop signal is acted on

Check = tuple[Callable[[JobSpec], list[str]], tuple[str, ...]]  # a check, the sections it reads


@dataclass(frozen=True)
class Ready:
    """A checked job and its plan, made from the inputs as they were when it was checked
    (not yet written into the output: `plan` does that)."""

    job: JobSpec
    plan: Plan


def output(job: JobSpec) -> OutputLayout:
    return OutputLayout(job.output.path, Storage(job.storage))


def prepare(load: Callable[[], JobSpec], more: Sequence[Check] = (),
            keep: bool = False) -> Ready:
    """The job `load` reads, checked (one JobFileError with every problem; `more` are the
    caller's own checks, flows/checks.py), and planned. `keep`: kept for the run of the
    same job this process starts next (`take`), as the CLI hands its job to the flow."""
    job = validate.checked_job(load, more)
    ready = Ready(job, make_plan(job, output(job).store))
    if keep:
        _READY.put(ready)
    return ready


def refuse_early(ready: Ready, force_resume: bool = False) -> None:
    """An output another run holds (OutputInUse), or a resume of another job's output
    (ResumeRefused), refused before any flow starts: a message, not a crashed flow run.
    The run refuses both again as it takes the output (its lease, `plan`)."""
    layout = output(ready.job)
    refuse_if_held(layout.store, layout.lease)
    if not force_resume and layout.store.exists(layout.plan):
        checkpoint.refuse_changed(layout, checkpoint.read_plan(layout), ready.plan)


def take(job: JobSpec) -> Ready | None:
    """The job `prepare` checked and planned in this process, if it is this one (once)."""
    return _READY.take(job)


class _Kept:
    """The one prepared job not yet taken by its run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: Ready | None = None

    @staticmethod
    def _of(job: JobSpec) -> str:
        return repr(job.model_dump())  # secrets too: in memory only

    def put(self, ready: Ready) -> None:
        with self._lock:
            self._ready = ready

    def take(self, job: JobSpec) -> Ready | None:
        with self._lock:
            ready, self._ready = self._ready, None
        return ready if ready is not None and self._of(ready.job) == self._of(job) else None


_READY = _Kept()


def plan(job: JobSpec, layout: OutputLayout, force_resume: bool = False,
         made: Plan | None = None) -> tuple[Plan, bool]:
    """The plan written into the output first; on resume the stored one, its fingerprint
    checked against the job's. `made`: the job's plan `prepare` made, else made here.
    Returns (plan, resumed)."""
    return checkpoint.open_plan(layout, made or make_plan(job, layout.store),
                                force_resume=force_resume)


@dataclass(frozen=True)
class Opened:
    pipeline: Pipeline
    progress: Progress  # this run's terminal progress and the tally of its rows
    load_s: float  # the engine's load time


def open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, *,
                  may_commit: Callable[[int], bool] = lambda shard_id: True,
                  show_progress: bool = False, live: metrics.RunMetrics | None = None,
                  listeners: Sequence[Listener] = (), engine: Engine | None = None,
                  restart: Callable[[Engine], Engine] | None = None,
                  worker: str | None = None) -> Opened:
    """The pipeline of this process, with the run's listeners: its progress, the live
    metrics (which read the progress's tally), the trace THINKBATCH_TRACE asks for, and
    the caller's. The engine is the job's (loaded once per process, `get_engine`),
    restarted when it dies; a caller may bring its own (tests, benchmarks) and how to
    restart it. A rollout job's tools are those the job's checks opened in this process,
    else opened first: a tool source that fails costs no model load. The pipeline closes
    the tools when it ends. Its rows name `worker` (default: this host and process id)."""
    toolbox = kept.take(job.rollout, Path.cwd()) if job.rollout else None
    try:
        return _open_pipeline(job, layout, plan, may_commit, show_progress, live, listeners,
                              engine, restart, toolbox,
                              worker or f"{socket.gethostname()}:{os.getpid()}")
    except BaseException:
        if toolbox is not None:
            toolbox.close()
        raise


def _open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan,
                   may_commit: Callable[[int], bool], show_progress: bool,
                   live: metrics.RunMetrics | None, listeners: Sequence[Listener],
                   engine: Engine | None, restart: Callable[[Engine], Engine] | None,
                   toolbox: Any, worker: str) -> Opened:
    started = time.monotonic()
    seeded = may_seed(job)
    if engine is None:
        engine = get_engine(job.engine, job.parsers, seeded)
        restart = restart or (lambda dead: restart_engine(job.engine, job.parsers, dead, seeded))
    load_s = time.monotonic() - started
    parser = OutputParser(job.parsers, engine.tokenizer, job.engine.model)
    engine.guard(parser.markers)

    def guarded(dead: Engine) -> Engine:
        assert restart is not None
        fresh = restart(dead)
        fresh.guard(parser.markers)
        return fresh

    schema = output_schema(input_schema(layout.store, plan, job.input.passthrough_columns)
                           if job.input.passthrough_columns else None,
                           rollout=job.rollout is not None, row_times=plan.row_times)
    n = job.sampling.n  # each sample is an output row
    progress = Progress(total=plan.total_rows * n,
                        already_done=plan.rows_in(checkpoint.done_shards(layout)) * n,
                        enabled=show_progress)
    pipeline = Pipeline(job, plan, layout, engine, parser, schema,
                        Listeners([progress, live, Trace.from_env(), *listeners]),
                        may_commit=may_commit,
                        restart_engine=guarded if restart is not None else None,
                        toolbox=toolbox,
                        carry=Carry(job, schema) if job.retry is not None else None,
                        worker=worker)
    if live is not None:
        live.follow(progress.tally, lambda: pipeline.in_flight)
    return Opened(pipeline, progress, load_s)


def work_shards(job: JobSpec, layout: OutputLayout, plan: Plan, owner: str,
                start_at: int = 0, show_progress: bool = False, worker_index: int = 0,
                listeners: Sequence[Listener] = (),
                track: Callable[[int, Future[ShardStats]], Callable[[], Any]] | None = None,
                worker: str | None = None) -> tuple[RunFigures, RunTally]:
    """Claim, run and release shards until every shard is done; returns this worker's
    figures (rates over its generation time) and the tally of its rows. The engine is
    loaded only once a shard is claimed. With `observability.metrics_port` set, live
    metrics are served until it returns. `listeners` watch the rows beside the run's own
    (the flow's progress artifact); `track` is told of each shard and its future
    as the pipeline takes it, and returns what to wait for before its claim is released
    (the flow's Prefect task of the shard). Its rows name `worker` (open_pipeline).

    SIGTERM or SIGINT (main thread) stops it cleanly: no new requests, the rows already
    generated committed, then the claims released (after the last commit, so no other
    worker starts on a shard while our parts are still being written); raises Stopped."""
    claims = ShardClaims(layout, plan, owner, job.scale.claim_ttl_s, start_at)
    run = RunFigures(shards=[], rows_generated=0, output_tokens=0, engine_load_s=0.0,
                     generation_s=0.0)
    opened: Opened | None = None
    active: dict[int, tuple[Future[ShardStats], Callable[[], Any]]] = {}
    entered = time.monotonic()
    started = 0.0
    next_look = 0.0  # when to list the store for claimable shards again
    idle_s = 0.0  # the wait after the last look that found nothing

    def wants() -> bool:
        return len(active) < MAX_OPEN_SHARDS and (opened is None
                                                  or opened.pipeline.wants_shard())

    with StopSignals() as stopping, metrics.serving(job, layout, plan, worker_index) as live:
        try:
            while not stopping.requested:
                if wants() and time.monotonic() >= next_look:
                    while wants():
                        asked = time.monotonic()
                        if (shard_id := claims.claim_next()) is None:
                            # Listings cost requests on S3: a worker that finds nothing
                            # looks again less and less often, until a shard of its own ends.
                            idle_s = min(IDLE_POLL_MAX_S, idle_s * 2) if idle_s else IDLE_POLL_S
                            next_look = time.monotonic() + idle_s
                            break
                        idle_s = 0.0
                        if opened is None:
                            with stopping.interruptible():
                                opened = open_pipeline(job, layout, plan,
                                                       may_commit=claims.still_ours,
                                                       show_progress=show_progress, live=live,
                                                       listeners=listeners, worker=worker)
                            run.engine_load_s = opened.load_s
                            started = asked = time.monotonic()  # a load is no claim's lead
                        done = opened.pipeline.submit_shard(shard_id, asked)
                        active[shard_id] = done, (track(shard_id, done) if track
                                                  else _nothing)
                    if not active and not claims.unfinished():
                        break
                if active:
                    wait([done for done, _ in active.values()], STOP_CHECK_S, FIRST_COMPLETED)
                else:
                    time.sleep(STOP_CHECK_S)
                if stopping.requested:
                    break
                for shard_id in [s for s, (done, _) in active.items() if done.done()]:
                    done, tracked = active.pop(shard_id)
                    try:
                        done.result()  # raises if the shard failed
                    except FencedOut:  # another worker has it: that shard only is given up
                        run.shards_lost = (run.shards_lost or 0) + 1
                    else:
                        run.shards.append(shard_id)
                    tracked()
                    claims.release(shard_id)  # a claim taken over is not ours to delete
                    next_look = 0.0  # a slot is free: look at once
        finally:
            try:
                if opened is not None:
                    pipeline = opened.pipeline
                    if stopping.requested:
                        pipeline.stop()
                    else:
                        pipeline.close()
                    for _, tracked in active.values():
                        tracked()
                    opened.progress.close()
                    run.engine_restarts = pipeline.restarts
                    run.turns_capped = pipeline.turns_capped
                    run.turns_rerendered = pipeline.conversations.rerendered
                    run.tool_results_hidden = pipeline.conversations.results_hidden
                    run.engine = pipeline.engine.layout
                    run.in_flight = pipeline.in_flight_limit.figures()
                    run.rows_generated = opened.progress.rows
                    run.output_tokens = opened.progress.tokens
                    run.generation_s = time.monotonic() - started
            finally:
                claims.release_all()
    if stopping.signum is not None:
        raise Stopped(stopping.signum, opened.pipeline.committed if opened else 0)
    tally = opened.progress.tally if opened is not None else RunTally()
    with_rates(run, run.generation_s or time.monotonic() - entered)
    run.metrics = tally.metrics(run.generation_s)
    return run, tally


def _nothing() -> None:
    """No shard task to wait for (a run without Prefect)."""


@dataclass(frozen=True)
class Finalized:
    manifest: Manifest
    markers: dict[int, ShardStats]
    report_page: str | None  # None: the page failed (a warning, never the job's failure)


def final_manifest(job: JobSpec, layout: OutputLayout, plan: Plan,
                   run: RunFigures) -> tuple[Manifest, dict[int, ShardStats]]:
    """Only when every shard is done: the markers read, orphan parts dropped (a fenced-out
    writer's), the manifest summed from the markers; not written yet."""
    markers = checkpoint.read_markers(layout, [s.shard_id for s in plan.shards])
    missing = [s for s, m in markers.items() if m is None]
    if missing:
        raise RuntimeError(f"{len(missing)} shards are unfinished (first: {missing[:5]})")
    done = {s: m for s, m in markers.items() if m is not None}
    run.orphan_parts_removed = checkpoint.sweep_orphans(layout, done)
    retry = manifest_section(job, plan) if job.retry is not None else None
    return build_manifest(job, plan, layout, done, run, retry), done


def finalize(job: JobSpec, layout: OutputLayout, plan: Plan, run: RunFigures) -> Finalized:
    """The manifest written last, then the report page (its failure is a warning)."""
    manifest, markers = final_manifest(job, layout, plan, run)
    checkpoint.write_manifest(layout, manifest)
    page = html_report.write_report_of_run(layout, manifest, markers.values())
    return Finalized(manifest, markers, page)
