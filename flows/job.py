"""The job as a Prefect flow: plan -> shards (one task each) -> finalize.

A shard, never a prompt, is a Prefect task. Shard tasks run a few at a time on
threads and all feed the one engine of this process, so the engine always has the
next shard's requests before the current shard's last ones finish.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from thinkbatch.tasks.vllm_env import prepare_vllm_env

prepare_vllm_env()

from thinkbatch.schemas.job import JobSpec  # noqa: E402
from thinkbatch.schemas.output import output_schema  # noqa: E402
from thinkbatch.schemas.plan import Plan  # noqa: E402
from thinkbatch.tasks import checkpoint, report  # noqa: E402
from thinkbatch.tasks.checkpoint import OutputLayout  # noqa: E402
from thinkbatch.tasks.engine import get_engine  # noqa: E402
from thinkbatch.tasks.lease import RunLease  # noqa: E402
from thinkbatch.tasks.parse import OutputParser  # noqa: E402
from thinkbatch.tasks.pipeline import Pipeline  # noqa: E402
from thinkbatch.tasks.plan import make_plan  # noqa: E402
from thinkbatch.tasks.read import input_schema  # noqa: E402
from thinkbatch.tasks.sampling import sampling_params  # noqa: E402
from thinkbatch.tasks.storage import Storage  # noqa: E402
from thinkbatch.tasks.validate import check_job  # noqa: E402
from thinkbatch.schemas.job_file import JobFileError  # noqa: E402

SHARDS_IN_FLIGHT = 4  # shard tasks registered with the engine at once


@task(name="plan", cache_policy=NO_CACHE)
def plan_job(job: JobSpec, layout: OutputLayout, force_resume: bool) -> tuple[Plan, bool]:
    return checkpoint.open_plan(layout, make_plan(job, layout.store), force_resume=force_resume)


@task(name="shard", cache_policy=NO_CACHE, task_run_name="shard-{shard_id}")
def run_shard(pipeline: Pipeline, shard_id: int) -> dict[str, Any]:
    return pipeline.submit_shard(shard_id).result()


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(job: JobSpec, layout: OutputLayout, plan: Plan, run: dict[str, Any]) -> dict[str, Any]:
    manifest = report.build_manifest(job, plan, layout, run)
    report.write_manifest(layout, manifest)
    return manifest


def open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, lease: RunLease,
                  pending_rows: int, done_rows: int,
                  show_progress: bool) -> tuple[Pipeline, float]:
    started = time.monotonic()
    engine = get_engine(job.engine)
    load_s = time.monotonic() - started
    parser = OutputParser(job.parsers, engine.tokenizer, job.engine.model)
    schema = output_schema(input_schema(layout.store, plan, job.input.passthrough_columns)
                           if job.input.passthrough_columns else None)
    progress = report.Progress(total=pending_rows + done_rows, already_done=done_rows,
                               enabled=show_progress)
    sampling = sampling_params(job) if job.engine.kind == "vllm" else None
    pipeline = Pipeline(job, plan, layout, engine, parser, sampling, schema, progress,
                        may_commit=lambda: lease.held)
    return pipeline, load_s


def _generate(spec: JobSpec, layout: OutputLayout, plan: Plan, lease: RunLease,
              show_progress: bool) -> dict[str, Any]:
    """Run the unfinished shards through one engine; returns this run's figures."""
    todo = [s for s in plan.shards if checkpoint.done_stats(layout, s.shard_id) is None]
    run: dict[str, Any] = {"shards_to_do": len(todo), "rows_generated": 0,
                           "output_tokens": 0, "engine_load_s": 0.0, "generation_s": 0.0}
    if not todo:
        return run
    pending = sum(s.num_rows for s in todo)
    pipeline, run["engine_load_s"] = open_pipeline(spec, layout, plan, lease, pending,
                                                   plan.total_rows - pending, show_progress)
    started = time.monotonic()
    try:
        run_shard.map(unmapped(pipeline), [s.shard_id for s in todo]).result()
    finally:
        pipeline.close()
        pipeline.progress.close()
    run.update(rows_generated=pipeline.progress.rows, output_tokens=pipeline.progress.tokens,
               generation_s=time.monotonic() - started)
    return run


@flow(name="generate-dataset", task_runner=ThreadPoolTaskRunner(max_workers=SHARDS_IN_FLIGHT),
      log_prints=True)
def generate_dataset(job: dict[str, Any], force_resume: bool = False,
                     show_progress: bool = False) -> dict[str, Any]:
    """Run a job end to end in this process (or resume it); returns the manifest.

    Checks run before any model loads; the output's lease keeps a second run out."""
    started = time.monotonic()
    spec = JobSpec.model_validate(job)
    errors = check_job(spec)
    if errors:
        raise JobFileError(errors)
    layout = OutputLayout(spec.output.path, Storage(spec.storage))
    lease = RunLease(layout.store, layout.lease).acquire().keep_renewed()
    try:
        plan, resumed = plan_job(spec, layout, force_resume)
        get_run_logger().info("%s: %d rows in %d shards%s", spec.name, plan.total_rows,
                              len(plan.shards), " (resuming)" if resumed else "")
        run = _generate(spec, layout, plan, lease, show_progress)
        gen_s = run["generation_s"] or 1e-9
        run.update(resumed=resumed, wall_s=time.monotonic() - started,
                   rows_per_s=run["rows_generated"] / gen_s,
                   output_tokens_per_s=run["output_tokens"] / gen_s)
        return finalize(spec, layout, plan, run)
    finally:
        lease.release()
