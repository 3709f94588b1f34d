"""The worker as Prefect runs it: the `thinkbatch-worker` flow of a scale-out job, one per
GPU node, and the shard task that shows each shard in the UI. The claim loop itself is
the runner's (tasks/runner.py `work_shards`): one engine, loaded once, claiming shards
until none are left, in-process for a one-worker job as on each node.

A shard, never a prompt, is a Prefect task. The loop learns that a shard is done from
the pipeline's future, never by asking Prefect: the API hears of a shard when its task
starts and ends, not while it generates.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import WithJsonSchema

from thinkbatch.flows import artifacts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError
from thinkbatch.schemas.manifest import RunFigures, ShardStats, WorkerFigures
from thinkbatch.tasks.jobs.validate import check_platform
from thinkbatch.tasks.process import guardian
from thinkbatch.tasks.process.stop import Stopped
from thinkbatch.tasks.process.vllm_env import prepare_vllm_env
from thinkbatch.tasks.rows.engine import close_engines
from thinkbatch.tasks.runner import MAX_OPEN_SHARDS, output, work_shards
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.heartbeat import Heartbeat

# The job as a flow parameter: Prefect validates it into a JobSpec before the flow runs.
# The JSON schema a server checks deployment runs against is any mapping: the one pydantic
# generates knows no aliases (`samples_per_prompt`; `json_schema`, the name under which
# run_deployment sends `json`), so the flow's own validation is the one that counts.
JobParameter = Annotated[JobSpec, WithJsonSchema({"type": "object", "title": "JobSpec"})]


@task(name="shard", cache_policy=NO_CACHE, task_run_name="shard-{shard_id}")
def run_shard(done: Future[ShardStats], shard_id: int) -> ShardStats | State:
    """The shard as Prefect shows it: ends with the pipeline's future, Cancelled when a
    stop left the shard unfinished (its committed rows stay, a rerun resumes it)."""
    try:
        return done.result()
    except CancelledError:
        return Cancelled(message="stopped before the shard was done; a rerun resumes it")


def track_shard(shard_id: int, done: Future[ShardStats]) -> Callable[[], object]:
    """The shard's Prefect task, started as the pipeline takes the shard; the worker loop
    waits for it before releasing the shard's claim."""
    return run_shard.submit(done, shard_id).wait


@flow(name="thinkbatch-worker", task_runner=ThreadPoolTaskRunner(max_workers=MAX_OPEN_SHARDS))
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
    layout = output(job)
    try:
        plan = checkpoint.read_plan(layout)
    except FileNotFoundError as e:
        raise JobFileError([f"output.path: no plan at {layout.plan} on this host: the "
                            "parent wrote it where this worker cannot see it (a local "
                            "folder not shared with this host)"]) from e
    run_id = flow_run.get_id() or "local"
    owner = f"worker-{worker_index}-{run_id}"
    name = flow_run.get_name() or owner  # its rows' `worker`, its figures' name in the manifest
    start_at = worker_index * len(plan.shards) // max(job.scale.workers, 1)
    progress = artifacts.ProgressArtifact(
        job.name, f"progress-worker-{worker_index}",
        f"worker {worker_index}: rows done in {layout.root}, as far as this worker knows",
        plan, job.sampling.n, checkpoint.done_shards(layout))
    beat = Heartbeat(layout.store, layout.worker_heartbeat(run_id), job.scale.heartbeat_timeout_s)

    def track(shard_id: int, done: Future[ShardStats]) -> Callable[[], object]:
        beat.claimed += 1
        return track_shard(shard_id, done)

    try:
        with beat:
            run, tally = work_shards(job, layout, plan, owner, start_at,
                                     worker_index=worker_index, listeners=[progress],
                                     track=track, worker=name)
        progress.finish()
        layout.store.write_atomic(layout.worker_figures(run_id), WorkerFigures(
            name=name, figures=run, tally=tally.state()).to_json())
        return run
    except Stopped as e:
        return Cancelled(message=f"{e}; its shards are free for other workers")
    finally:
        close_engines()
