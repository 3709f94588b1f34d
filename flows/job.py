"""The job as a Prefect flow: plan -> shards on one or K workers -> finalize.

With `scale.workers: 1` (the default) the worker loop runs in this process: no server
needed. With K > 1 the flow starts K `thinkbatch-worker` flow runs on a GPU work pool
(`run_deployment`, idempotency keys from this run and the worker index, so a retried
parent does not double them), waits for them, starts new ones while shards remain
(up to `scale.worker_retries` rounds), then finalizes one dataset.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from thinkbatch.flows import artifacts, events
from thinkbatch.flows.checks import prepared
from thinkbatch.flows.worker import JobParameter, track_shard
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import Manifest, RunFigures, WorkerFigures
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks import runner
from thinkbatch.tasks.process import guardian
from thinkbatch.tasks.process.stop import Stopped
from thinkbatch.tasks.process.vllm_env import prepare_vllm_env
from thinkbatch.tasks.report.figures import merge_workers
from thinkbatch.tasks.runner import MAX_OPEN_SHARDS
from thinkbatch.tasks.store import checkpoint, heartbeat
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.lease import acquire_run_lease

WORKER_POLL_S = 5.0


@task(name="plan", cache_policy=NO_CACHE)
def plan_job(job: JobSpec, layout: OutputLayout, force_resume: bool,
             made: Plan) -> tuple[Plan, bool]:
    """The prepared plan written into the output, or the stored one on resume. The caller
    passes `made` quoted: Prefect would otherwise walk every shard of it."""
    return runner.plan(job, layout, force_resume, made)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(job: JobSpec, layout: OutputLayout, plan: Plan, run: RunFigures) -> Manifest:
    """Only when every shard is done: drop orphan parts, then write the manifest last;
    the run's results as artifacts and its finished event."""
    done = runner.finalize(job, layout, plan, run)
    artifacts.publish_results(done.manifest, layout, done.markers, done.report_page)
    events.finished(job, layout, done.manifest, done.report_page)
    return done.manifest


def _wait_round(run_ids: list[Any], layout: OutputLayout, plan: Plan, timeout_s: float,
                progress: artifacts.ProgressArtifact) -> list[Any]:
    """Until every worker run ends, or the job is done. A worker is judged by its
    heartbeat (store/heartbeat.py), not by its state alone: a SIGKILLed worker never
    reports an end, so one whose heartbeat is older than `timeout_s` is marked Crashed
    (the state in the UI tells the truth, and a round whose workers all vanished ends);
    once every shard is done, one that never claimed a shard (still pulling its image or
    loading its model) is cancelled, so its node is free at once. The job's progress
    artifact follows the done shards."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Crashed

    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in run_ids]
            live = [r for r in runs if r.state is None or not r.state.is_final()]
            if not live:
                return runs
            done = checkpoint.done_shards(layout)
            progress.set(plan.percent_in(done))
            for r in live:
                running = r.state is not None and r.state.is_running() and r.start_time
                running_s = ((datetime.now(timezone.utc) - r.start_time).total_seconds()
                             if running else None)
                judged = heartbeat.verdict(
                    heartbeat.read(layout.store, layout.worker_heartbeat(str(r.id))),
                    running_s, len(done) == len(plan.shards), timeout_s)
                if judged is None:
                    continue
                action, why = judged
                if action == "crash":
                    client.set_flow_run_state(r.id, Crashed(message=why), force=True)
                elif r.state is None or r.state.is_scheduled():  # nothing runs yet
                    client.set_flow_run_state(r.id, Cancelled(message=why), force=True)
                elif not r.state.is_cancelling():  # its Prefect worker stops it
                    client.set_flow_run_state(r.id, Cancelling(message=why), force=True)
            time.sleep(WORKER_POLL_S)


def run_workers(spec: JobSpec, layout: OutputLayout, plan: Plan,
                progress: artifacts.ProgressArtifact) -> RunFigures:
    """K worker flow runs, in rounds while shards remain; Prefect shows each one's truth.
    The run's figures are the workers' (each writes its own as it ends), their rates
    over the time the rounds took. Shards left after the last round fail the job with
    what the failed workers said (a worker that cannot run the engine says why)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    parent = flow_run.get_id()
    started = time.monotonic()
    rounds: list[dict[str, str]] = []
    run_ids: list[Any] = []
    failures: dict[str, list[str]] = {}  # a failed worker's message -> the runs that gave it
    for round_no in range(spec.scale.worker_retries + 1):
        runs = [run_deployment(spec.scale.worker_deployment, timeout=0,
                               parameters={"job": spec, "worker_index": i},
                               idempotency_key=f"{parent}-round{round_no}-worker{i}")
                for i in range(spec.scale.workers)]
        run_ids += [r.id for r in runs]
        ended = _wait_round([r.id for r in runs], layout, plan,
                            spec.scale.heartbeat_timeout_s, progress)
        rounds.append({r.name: r.state.type.value for r in ended})
        for r in ended:
            if r.state.is_failed():
                failures.setdefault(r.state.message or "no message", []).append(r.name)
        left = len(plan.shards) - len(checkpoint.done_shards(layout))
        logger.info("round %d: workers %s; %d shards left", round_no, rounds[-1], left)
        if not left:
            break
    run = merge_workers(_worker_figures(layout, run_ids), time.monotonic() - started)
    if left:  # what the workers said, not only that shards are left
        raise RuntimeError(
            f"{left} shards are unfinished after {len(rounds)} round(s) of workers"
            + "".join(f"; {', '.join(names)} failed: {message}"
                      for message, names in failures.items()))
    run.worker_rounds = rounds
    return run


def _worker_figures(layout: OutputLayout, run_ids: list[Any]) -> list[WorkerFigures]:
    """The figures the workers wrote, read once and removed: the manifest keeps them.
    The heartbeats a killed worker left go too."""
    found = []
    for run_id in run_ids:
        if layout.store.exists(beat := layout.worker_heartbeat(str(run_id))):
            layout.store.delete(beat)
        path = layout.worker_figures(str(run_id))
        try:
            found.append(WorkerFigures.model_validate_json(layout.store.read_bytes(path)))
        except FileNotFoundError:  # killed, stopped, or failed before its end
            continue
        layout.store.delete(path)
    return found


@flow(name="generate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=MAX_OPEN_SHARDS),
      log_prints=True)
def generate_dataset(job: JobParameter | str, force_resume: bool = False,
                     show_progress: bool = False) -> Manifest | State:
    """Run a job end to end (or resume it); returns the manifest, or a Cancelled state
    after a clean stop on a signal (the caller gets prefect's CancelledRun). A deployment
    run may pass the job inline or as the path of a job file on the runner.

    Checks run before any model loads; the output's run lease keeps a second run out."""
    prepare_vllm_env()  # first: a deployment run enters here, and the checks import vLLM
    started = time.monotonic()
    # A CLI run was checked and planned in this process already; a deployment run was not.
    ready = (runner.take(job) if isinstance(job, JobSpec) else None) or prepared(
        lambda: load_job(job) if isinstance(job, str) else job)
    spec = ready.job
    layout = runner.output(spec)
    lease = acquire_run_lease(layout.store, layout.lease)
    try:
        plan, resumed = plan_job(spec, layout, force_resume, quote(ready.plan))
        done_before = checkpoint.done_shards(layout)
        get_run_logger().info("%s: %d rows in %d shards, %d done%s", spec.name,
                              plan.total_rows, len(plan.shards), len(done_before),
                              " (resuming)" if resumed else "")
        events.started(spec, layout, plan.total_rows, len(plan.shards), len(done_before),
                       resumed)
        progress = artifacts.ProgressArtifact(
            spec.name, "progress", f"{spec.name}: rows done in {layout.root}", plan,
            spec.sampling.n, done_before)
        if spec.scale.workers == 1:
            guardian.start()  # the engine's processes die with this one (a deployment run)
            run, _ = runner.work_shards(spec, layout, plan, owner=f"run-{lease.owner}",
                                        show_progress=show_progress, listeners=[progress],
                                        track=track_shard, worker=flow_run.get_name())
        else:
            run = run_workers(spec, layout, plan, progress)
        run.resumed, run.wall_s = resumed, time.monotonic() - started
        manifest = finalize(spec, layout, plan, run)
        progress.set(100.0)
        return manifest
    except Stopped as e:  # a clean stop: the run shows Cancelled, a rerun resumes
        events.stopped(spec, layout, str(e))
        return Cancelled(message=str(e))
    except Exception as e:
        events.failed(spec, layout, e)
        raise
    finally:
        lease.release()
