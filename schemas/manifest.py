"""The JSON records an output folder holds besides its data: a done shard's marker and
the manifest, with the figures of the run that wrote it.

Writers and readers share these shapes instead of passing dicts between files. The files
keep the keys and values they always had, so earlier outputs resume and tools reading
them keep working: `to_json` writes with `json.dumps` as before and leaves out a figure
that does not apply to a run rather than writing null, because readers test for the key."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


class _Document(BaseModel):
    def to_json(self, indent: int | None = None) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True),
                          indent=indent).encode()


class ShardStats(_Document):
    """A done shard's marker (`_shards/NNNNNN.json`): its counts, which the manifest sums
    without rescanning data, and the parts that hold it (any other part is an orphan).
    Only `parts` is required (what a retry and the orphan sweep read); counts not written
    sum as zero."""

    rows: int = 0
    status: dict[str, int] = {}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Rollout jobs only: assistant turns, tools run and tools that failed.
    turns: int | None = None
    tool_calls_total: int | None = None
    tool_errors: int | None = None
    parts: list[str]


class RunFigures(BaseModel):
    """What one run did (the manifest's `this_run`). The worker loop fills the first group
    (absent when workers ran as flow runs of their own); the job flow adds the rest."""

    shards: list[int] | None = None
    rows_generated: int = 0
    output_tokens: int | None = None
    engine_load_s: float | None = None
    generation_s: float | None = None
    engine_restarts: int | None = None  # once an engine was loaded

    worker_rounds: list[dict[str, str]] | None = None  # workers > 1: run name -> end state
    resumed: bool | None = None
    wall_s: float | None = None
    rows_per_s: float | None = None
    output_tokens_per_s: float | None = None
    orphan_parts_removed: int | None = None


class RetrySummary(BaseModel):
    """What a retry did: its source, the statuses redone, how many rows, what changed."""

    source: str
    statuses: list[str]
    rows_retried: int
    changes: list[str]


class Manifest(_Document):
    """`_manifest.json`, written last: the job's totals, this run's figures, the config
    (what `retry` and `reparse` start from) and the versions that made it."""

    job: str
    rows: int
    input_rows: int
    status_counts: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    turns: int | None = None  # rollout jobs: the shards' sums
    tool_calls_total: int | None = None
    tool_errors: int | None = None
    shards: int
    fingerprint: str
    this_run: RunFigures
    config: dict[str, Any]
    versions: dict[str, str | None]
    data: str
    retry: RetrySummary | None = None
