"""The worker: one engine, loaded once, claiming shards until none are left.

A shard, never a prompt, is a Prefect task. Shard tasks run a few at a time on
threads and all feed the one engine of this process, so the engine always has the
next shard's requests before the current shard's last ones finish. The same loop runs
in-process for a one-worker job and as the `thinkbatch-worker` flow on each GPU node.

The loop learns that a shard is done from the pipeline's future, never by asking Prefect:
the API hears of a shard when its task starts and ends, not while it generates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import WithJsonSchema

from thinkbatch.flows import artifacts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError
from thinkbatch.schemas.manifest import RunFigures, ShardStats, WorkerFigures
from thinkbatch.schemas.output import output_schema
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.jobs.validate import check_platform
from thinkbatch.tasks.process import guardian
from thinkbatch.tasks.process.stop import Stopped, StopSignals
from thinkbatch.tasks.process.vllm_env import prepare_vllm_env
from thinkbatch.tasks.report import metrics
from thinkbatch.tasks.report.figures import RunTally
from thinkbatch.tasks.report.progress import Progress
from thinkbatch.tasks.rows.engine import Engine, close_engines, get_engine, restart_engine
from thinkbatch.tasks.rows.engine_settings import may_seed
from thinkbatch.tasks.rows.parse import OutputParser
from thinkbatch.tasks.rows.pipeline import Pipeline
from thinkbatch.tasks.rows.read import input_schema
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.claims import ShardClaims
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage
from thinkbatch.tasks.tools import kept
from thinkbatch.tasks.tools.toolbox import Toolbox

# The job as a flow parameter: Prefect validates it into a JobSpec before the flow runs.
# The JSON schema a server checks deployment runs against is any mapping: the one pydantic
# generates knows no aliases (`samples_per_prompt`; `json_schema`, the name under which
# run_deployment sends `json`), so the flow's own validation is the one that counts.
JobParameter = Annotated[JobSpec, WithJsonSchema({"type": "object", "title": "JobSpec"})]

SHARDS_IN_FLIGHT = 4  # shard tasks registered with the engine at once
IDLE_POLL_S = 2.0  # how often a worker with nothing to claim looks for freed shards
STOP_CHECK_S = 0.5  # how soon a recorded stop signal is acted on


@task(name="shard", cache_policy=NO_CACHE, task_run_name="shard-{shard_id}")
def run_shard(done: Future[ShardStats], shard_id: int) -> ShardStats | State:
    """The shard as Prefect shows it: ends with the pipeline's future, Cancelled when a
    stop left the shard unfinished (its committed rows stay, a rerun resumes it)."""
    try:
        return done.result()
    except CancelledError:
        return Cancelled(message="stopped before the shard was done; a rerun resumes it")


def open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, claims: ShardClaims,
                  show_progress: bool,
                  live: metrics.RunMetrics | None = None) -> tuple[Pipeline, float]:
    """The engine, and for a rollout job its tools (those the job's checks opened in this
    process, else opened first: a tool source that fails costs no model load); the
    pipeline closes the tools when it ends."""
    toolbox = kept.take(job.rollout, Path.cwd()) if job.rollout else None
    try:
        return _open_pipeline(job, layout, plan, claims, show_progress, toolbox, live)
    except BaseException:
        if toolbox is not None:
            toolbox.close()
        raise


def _open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, claims: ShardClaims,
                   show_progress: bool, toolbox: Toolbox | None,
                   live: metrics.RunMetrics | None) -> tuple[Pipeline, float]:
    started = time.monotonic()
    seeded = may_seed(job)
    engine = get_engine(job.engine, job.parsers, seeded)
    load_s = time.monotonic() - started
    parser = OutputParser(job.parsers, engine.tokenizer, job.engine.model)
    engine.guard(parser.markers)

    def restart(dead: Engine) -> Engine:
        fresh = restart_engine(job.engine, job.parsers, dead, seeded)
        fresh.guard(parser.markers)
        return fresh

    schema = output_schema(input_schema(layout.store, plan, job.input.passthrough_columns)
                           if job.input.passthrough_columns else None,
                           rollout=job.rollout is not None)
    done = checkpoint.done_shards(layout)
    done_rows = plan.rows_in(done)
    n = job.sampling.n  # each sample is an output row
    progress = Progress(total=plan.total_rows * n, already_done=done_rows * n,
                               enabled=show_progress)
    pipeline = Pipeline(job, plan, layout, engine, parser, schema, progress,
                        may_commit=claims.still_ours,
                        restart_engine=restart,
                        toolbox=toolbox, metrics=live)
    return pipeline, load_s


def work_shards(job: JobSpec, layout: OutputLayout, plan: Plan, owner: str,
                start_at: int = 0, show_progress: bool = False, worker_index: int = 0,
                watch: Callable[[Progress], None] | None = None
                ) -> tuple[RunFigures, RunTally]:
    """Claim, run and release shards until every shard is done; returns this worker's
    figures and the tally of its rows. The engine is loaded only once a shard is claimed.
    With `observability.metrics_port` set, live metrics are served until it returns.
    `watch` sees the progress each time the loop wakes (a progress artifact's updates).

    SIGTERM or SIGINT (main thread) stops it cleanly: no new requests, the rows already
    generated committed, then the claims released (after the last commit, so no other
    worker starts on a shard while our parts are still being written); raises Stopped."""
    claims = ShardClaims(layout, plan, owner, job.scale.claim_ttl_s, start_at)
    run = RunFigures(shards=[], rows_generated=0, output_tokens=0, engine_load_s=0.0,
                     generation_s=0.0)
    pipeline: Pipeline | None = None
    active: dict[int, tuple[Future[ShardStats], PrefectFuture]] = {}
    started = 0.0
    next_look = 0.0  # when to list the store for claimable shards again
    with StopSignals() as stopping, metrics.serving(job, layout, plan, worker_index) as live:
        try:
            while not stopping.requested:
                if len(active) < SHARDS_IN_FLIGHT and time.monotonic() >= next_look:
                    while len(active) < SHARDS_IN_FLIGHT and (shard_id := claims.claim_next()) is not None:
                        if pipeline is None:
                            with stopping.interruptible():
                                pipeline, run.engine_load_s = open_pipeline(
                                    job, layout, plan, claims, show_progress, live)
                            started = time.monotonic()
                        done = pipeline.submit_shard(shard_id)
                        active[shard_id] = done, run_shard.submit(done, shard_id)
                    if not active and not claims.unfinished():
                        break
                    # Listings cost requests on S3: until a slot frees up, look for shards
                    # that other workers give up only every IDLE_POLL_S.
                    next_look = time.monotonic() + IDLE_POLL_S
                if active:
                    wait([done for done, _ in active.values()], STOP_CHECK_S, FIRST_COMPLETED)
                else:
                    time.sleep(STOP_CHECK_S)
                if stopping.requested:
                    break
                for shard_id in [s for s, (done, _) in active.items() if done.done()]:
                    done, shard_task = active.pop(shard_id)
                    done.result()  # raises if the shard failed
                    shard_task.wait()
                    claims.release(shard_id)
                    run.shards.append(shard_id)
                    next_look = 0.0  # a slot is free: look at once
                if watch is not None and pipeline is not None:
                    watch(pipeline.progress)
        finally:
            try:
                if pipeline is not None:
                    if stopping.requested:
                        pipeline.stop()
                    else:
                        pipeline.close()
                    for _, shard_task in active.values():
                        shard_task.wait()
                    pipeline.progress.close()
                    run.engine_restarts = pipeline.restarts
                    run.engine = pipeline.engine.layout
                    run.rows_generated = pipeline.progress.rows
                    run.output_tokens = pipeline.progress.tokens
                    run.generation_s = time.monotonic() - started
            finally:
                claims.release_all()
    if stopping.signum is not None:
        raise Stopped(stopping.signum, pipeline.committed if pipeline else 0)
    tally = pipeline.progress.tally if pipeline is not None else RunTally()
    if run.generation_s:
        run.rows_per_s = run.rows_generated / run.generation_s
        run.output_tokens_per_s = run.output_tokens / run.generation_s
    run.metrics = tally.metrics(run.generation_s)
    return run, tally


@flow(name="thinkbatch-worker", task_runner=ThreadPoolTaskRunner(max_workers=SHARDS_IN_FLIGHT))
def shard_worker(job: JobParameter, worker_index: int = 0) -> RunFigures | State:
    """One GPU node's share of a job started by `generate-dataset` with workers > 1.

    Its engine's processes end with this flow-run process however it ends (the guardian
    covers a SIGKILL); Prefect's cancellation (SIGTERM) stops it cleanly, shown Cancelled.
    A node whose vLLM build cannot run the engine (DCP on the CPU build) fails the run
    before it claims a shard, with the message `thinkbatch validate` gives on that node."""
    prepare_vllm_env()  # first: a deployment run enters here, before anything imports vLLM
    if errors := check_platform(job):  # the parent planned it on a machine of its own
        raise JobFileError(errors)
    guardian.start()
    layout = OutputLayout(job.output.path, Storage(job.storage))
    plan = checkpoint.read_plan(layout)
    run_id = flow_run.get_id() or "local"
    owner = f"worker-{worker_index}-{run_id}"
    start_at = worker_index * len(plan.shards) // max(job.scale.workers, 1)
    progress = artifacts.ProgressArtifact(
        job.name, f"progress-worker-{worker_index}",
        f"worker {worker_index}: rows done in {layout.root}, as far as this worker knows")
    try:
        run, tally = work_shards(job, layout, plan, owner, start_at, worker_index=worker_index,
                                 watch=progress.watch)
        progress.finish()
        layout.store.write_atomic(layout.worker_figures(run_id), WorkerFigures(
            name=flow_run.get_name() or owner, figures=run, tally=tally.state()).to_json())
        return run
    except Stopped as e:
        return Cancelled(message=f"{e}; its shards are free for other workers")
    finally:
        close_engines()
