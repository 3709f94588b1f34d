"""The worker: one engine, loaded once, claiming shards until none are left.

A shard, never a prompt, is a Prefect task. Shard tasks run a few at a time on
threads and all feed the one engine of this process, so the engine always has the
next shard's requests before the current shard's last ones finish. The same loop runs
in-process for a one-worker job and as the `thinkbatch-worker` flow on each GPU node.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from thinkbatch.tasks.vllm_env import prepare_vllm_env

prepare_vllm_env()

from thinkbatch.schemas.job import JobSpec  # noqa: E402
from thinkbatch.schemas.output import output_schema  # noqa: E402
from thinkbatch.schemas.plan import Plan  # noqa: E402
from thinkbatch.tasks import checkpoint, report  # noqa: E402
from thinkbatch.tasks.checkpoint import OutputLayout  # noqa: E402
from thinkbatch.tasks.claims import ShardClaims  # noqa: E402
from thinkbatch.tasks.engine import get_engine  # noqa: E402
from thinkbatch.tasks.parse import OutputParser  # noqa: E402
from thinkbatch.tasks.pipeline import Pipeline  # noqa: E402
from thinkbatch.tasks.read import input_schema  # noqa: E402
from thinkbatch.tasks.storage import Storage  # noqa: E402

SHARDS_IN_FLIGHT = 4  # shard tasks registered with the engine at once
IDLE_POLL_S = 2.0  # how often a worker with nothing to claim looks for freed shards


@task(name="shard", cache_policy=NO_CACHE, task_run_name="shard-{shard_id}")
def run_shard(pipeline: Pipeline, shard_id: int) -> dict[str, Any]:
    return pipeline.submit_shard(shard_id).result()


def open_pipeline(job: JobSpec, layout: OutputLayout, plan: Plan, claims: ShardClaims,
                  show_progress: bool) -> tuple[Pipeline, float]:
    started = time.monotonic()
    engine = get_engine(job.engine)
    load_s = time.monotonic() - started
    parser = OutputParser(job.parsers, engine.tokenizer, job.engine.model)
    schema = output_schema(input_schema(layout.store, plan, job.input.passthrough_columns)
                           if job.input.passthrough_columns else None)
    done = checkpoint.done_shards(layout)
    done_rows = sum(s.num_rows for s in plan.shards if s.shard_id in done)
    progress = report.Progress(total=plan.total_rows, already_done=done_rows,
                               enabled=show_progress)
    pipeline = Pipeline(job, plan, layout, engine, parser, schema, progress,
                        may_commit=claims.still_ours)
    return pipeline, load_s


def work_shards(job: JobSpec, layout: OutputLayout, plan: Plan, owner: str,
                start_at: int = 0, show_progress: bool = False) -> dict[str, Any]:
    """Claim, run and release shards until every shard is done; returns this worker's
    figures. The engine is loaded only once a shard is claimed."""
    claims = ShardClaims(layout, plan, owner, job.scale.claim_ttl_s, start_at)
    run: dict[str, Any] = {"shards": [], "rows_generated": 0, "output_tokens": 0,
                           "engine_load_s": 0.0, "generation_s": 0.0}
    pipeline: Pipeline | None = None
    active: dict[int, PrefectFuture] = {}
    started = 0.0
    next_look = 0.0  # when to list the store for claimable shards again
    try:
        while True:
            for shard_id in [s for s, f in active.items() if f.state.is_final()]:
                active.pop(shard_id).result()  # raises if the shard failed
                claims.release(shard_id)
                run["shards"].append(shard_id)
                next_look = 0.0  # a slot is free: look at once
            if len(active) < SHARDS_IN_FLIGHT and time.monotonic() >= next_look:
                while len(active) < SHARDS_IN_FLIGHT and (shard_id := claims.claim_next()) is not None:
                    if pipeline is None:
                        pipeline, run["engine_load_s"] = open_pipeline(job, layout, plan, claims,
                                                                       show_progress)
                        started = time.monotonic()
                    active[shard_id] = run_shard.submit(pipeline, shard_id)
                if not active and not claims.unfinished():
                    break
                # Listings cost requests on S3: until a slot frees up, look for shards
                # that other workers give up only every IDLE_POLL_S.
                next_look = time.monotonic() + IDLE_POLL_S
            time.sleep(0.2)
    finally:
        claims.release_all()
        if pipeline is not None:
            pipeline.close()
            pipeline.progress.close()
            run.update(rows_generated=pipeline.progress.rows,
                       output_tokens=pipeline.progress.tokens,
                       generation_s=time.monotonic() - started)
    return run


@flow(name="thinkbatch-worker", task_runner=ThreadPoolTaskRunner(max_workers=SHARDS_IN_FLIGHT))
def shard_worker(job: dict[str, Any], worker_index: int = 0) -> dict[str, Any]:
    """One GPU node's share of a job started by `generate-dataset` with workers > 1."""
    spec = JobSpec.model_validate(job)
    layout = OutputLayout(spec.output.path, Storage(spec.storage))
    plan = checkpoint.read_plan(layout)
    owner = f"worker-{worker_index}-{flow_run.get_id() or 'local'}"
    start_at = worker_index * len(plan.shards) // max(spec.scale.workers, 1)
    return work_shards(spec, layout, plan, owner, start_at)
