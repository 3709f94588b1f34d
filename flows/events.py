"""Prefect events a run emits, for automations to act on: `thinkbatch.job.started`,
`.finished`, `.failed` and `.stopped`, each about the job's output (the resource), with
its counts in the payload. Prefect relates them to the flow run that emitted them.

An automation's trigger matches resource labels, not payload values, so the finished
event's resource also says how large its share of non-ok rows is: label
`thinkbatch.non-ok-over` is the largest of NON_OK_STEPS (percent) that the share
exceeds, or "none"; "alert past 5%" matches it against ["5", "10", "25", "50"] (README,
"Watching a run"). Like artifacts, an event that cannot be sent costs a warning only.
"""

from __future__ import annotations

import logging
from typing import Any

from thinkbatch.flows.artifacts import safely
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import Manifest
from thinkbatch.schemas.output import Status
from thinkbatch.tasks.store.layout import OutputLayout

log = logging.getLogger("thinkbatch.events")

NON_OK_STEPS = (0, 1, 5, 10, 25, 50)  # percent


def non_ok_over(share: float) -> str:
    """The largest step (percent) that `share` (0..1) exceeds, as a label value."""
    over = [s for s in NON_OK_STEPS if share * 100 > s]
    return str(over[-1]) if over else "none"


def resource(job: JobSpec, layout: OutputLayout, **labels: str) -> dict[str, str]:
    return {"prefect.resource.id": f"thinkbatch.output.{layout.root}",
            "prefect.resource.name": job.name, "thinkbatch.job": job.name,
            "thinkbatch.output": layout.root, **labels}


def _emit(event: str, res: dict[str, str], payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    safely(log, f"emit {event}", emit_event, event, resource=res, payload=payload)


def started(job: JobSpec, layout: OutputLayout, input_rows: int, shards: int,
            shards_done: int, resumed: bool) -> None:
    _emit("thinkbatch.job.started", resource(job, layout), {
        "input_rows": input_rows, "shards": shards, "shards_done": shards_done,
        "resumed": resumed, "workers": job.scale.workers, "model": job.engine.model})


def finished(job: JobSpec, layout: OutputLayout, manifest: Manifest,
             report_page: str | None) -> None:
    non_ok = manifest.rows - manifest.status_counts.get(Status.OK.value, 0)
    share = non_ok / manifest.rows if manifest.rows else 0.0
    run = manifest.this_run
    metrics = run.metrics
    _emit("thinkbatch.job.finished", resource(job, layout, **{
        "thinkbatch.non-ok-over": non_ok_over(share)}), {
        "rows": manifest.rows, "input_rows": manifest.input_rows,
        "status_counts": manifest.status_counts, "non_ok": non_ok, "non_ok_share": share,
        "rows_generated": run.rows_generated, "resumed": run.resumed, "wall_s": run.wall_s,
        "output_tokens_per_s": run.output_tokens_per_s,
        "requests_per_s": metrics.requests_per_s if metrics else None,
        "ttft_s_p50": metrics.ttft_s.p50 if metrics and metrics.ttft_s else None,
        "latency_s_p99": metrics.latency_s.p99 if metrics and metrics.latency_s else None,
        "manifest": layout.manifest, "report": report_page})


def failed(job: JobSpec, layout: OutputLayout, error: BaseException) -> None:
    _emit("thinkbatch.job.failed", resource(job, layout),
          {"error": f"{type(error).__name__}: {error}"})


def stopped(job: JobSpec, layout: OutputLayout, message: str) -> None:
    _emit("thinkbatch.job.stopped", resource(job, layout), {"message": message})
