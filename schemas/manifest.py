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


class EngineChoice(BaseModel):
    """An engine argument thinkbatch set at run time because this platform needs it
    (tasks/rows/engine_settings.py): no preset pins it, since other machines refuse it."""

    setting: str
    value: Any
    reason: str


class EngineLayout(BaseModel):
    """The engine that generated rows, as vLLM reports it after loading: the parallel
    layout (TP8 and DCP8 parts of one dataset differ here, not in the fingerprint), the
    attention backend its workers run, the KV cache, and the settings chosen for the
    platform. Equal layouts are one engine for the manifest's summary."""

    vllm: str
    device: str  # vLLM's platform: cuda, cpu...
    tensor_parallel_size: int
    decode_context_parallel_size: int
    pipeline_parallel_size: int
    attention_backend: str | None = None  # None: the workers could not be asked
    dtype: str
    kv_cache_dtype: str
    block_size: int
    kv_cache_tokens: int | None = None  # vLLM's "KV cache size: N tokens"
    chunked_prefill: bool
    prefix_caching: bool
    choices: list[EngineChoice] = []


class EngineUse(EngineLayout):
    """A layout in the manifest's summary and the done shards it generated (by their
    markers: a shard resumed on another engine counts for the one that finished it)."""

    shards: int
    rows: int


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
    # When each part was committed (Unix time), by name: the report's throughput over the
    # run. Absent in older markers and for parts an earlier, killed run left.
    committed_at: dict[str, float] | None = None
    # The engine that generated the parts in committed_at (a vLLM job's; absent in older
    # markers and when this run generated none of the shard's rows).
    engine: EngineLayout | None = None


class Spread(BaseModel):
    """Seconds over this run's rows: the exact mean, and percentiles read from log-spaced
    bins (tasks/report/tally.py, within 0.6%), so no run holds a column of them."""

    mean: float
    p50: float
    p90: float
    p99: float


class Tokens(BaseModel):
    """A token count over this run's rows: the total, and the mean per row that had one."""

    total: int
    mean: float | None = None


class Metrics(BaseModel):
    """The seed's metrics table for the rows this run generated (rows an earlier run left
    are in the manifest's totals, not here): rows by status, engine requests (a rollout's
    every turn) per second of generation, TTFT and latency, and where the tokens went."""

    status: dict[str, int]
    requests: int
    requests_per_s: float | None = None
    ttft_s: Spread | None = None
    latency_s: Spread | None = None
    prompt_tokens: Tokens
    completion_tokens: Tokens
    reasoning_tokens: Tokens
    answer_tokens: Tokens  # completion tokens past the reasoning: the answer, tool calls


class InFlightFigures(BaseModel):
    """The engine's in-flight limit as the run ended (tasks/rows/in_flight.py): the job's cap,
    the KV-cache tokens the engine reported, the tokens a request was expected to hold."""

    cap: int
    kv_cache_tokens: int | None = None
    expected_tokens_per_row: int
    limit: int


class RunFigures(BaseModel):
    """What one run did (the manifest's `this_run`). The worker loop fills the first group
    (absent when workers ran as flow runs of their own); the job flow adds the rest."""

    shards: list[int] | None = None
    rows_generated: int = 0
    output_tokens: int | None = None
    engine_load_s: float | None = None
    generation_s: float | None = None
    engine_restarts: int | None = None  # once an engine was loaded
    # Turns (a single-turn job's rows) whose max_tokens was cut to the room their prompt
    # left in max_model_len (sampling.min_room_tokens).
    turns_capped: int | None = None
    # Rollout turns whose chat template wrote the previous turn's prompt otherwise (earlier
    # reasoning dropped...): tokenized from where the two differ (tasks/rows/history.py).
    turns_rerendered: int | None = None
    # Tool results hidden to fit a history in its budget (rollout.context:
    # hide_tool_results, tasks/rows/context.py).
    tool_results_hidden: int | None = None
    engine: EngineLayout | None = None  # this run's vLLM engine, as loaded
    in_flight: InFlightFigures | None = None  # requests in the engine at once
    shards_lost: int | None = None  # claims another worker took over (a pause past the TTL)
    metrics: Metrics | None = None

    worker_rounds: list[dict[str, str]] | None = None  # workers > 1: run name -> end state
    workers: dict[str, RunFigures] | None = None  # workers > 1: run name -> its figures
    resumed: bool | None = None
    wall_s: float | None = None
    rows_per_s: float | None = None
    output_tokens_per_s: float | None = None
    orphan_parts_removed: int | None = None


class SecondsState(BaseModel):
    """A `Seconds` tally's bins that are not empty (bin -> rows), sum and extremes."""

    bins: dict[int, int]
    total: float
    low: float
    high: float


class TallyState(BaseModel):
    """A worker's `RunTally` (tasks/report/figures.py) as it hands it to the parent: counts and
    bins add up, so the parent's percentiles are those of every worker's rows."""

    status: dict[str, int] = {}
    requests: int = 0
    prompted: int = 0
    completed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    ttft_s: SecondsState | None = None
    latency_s: SecondsState | None = None


class WorkerFigures(_Document):
    """`_workers/<flow run id>.json`: what a scale-out worker did, written as it ends; the
    parent reads its workers' at finalize (the manifest keeps their figures) and removes
    them. A SIGKILLed worker leaves none: its committed rows count in the output's totals."""

    name: str  # the worker's flow run name
    figures: RunFigures
    tally: TallyState


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
    # The engines that generated the done shards, one entry per layout: more than one
    # when parts of the dataset came from different layouts (TP8, DCP8...).
    engines: list[EngineUse] | None = None
    fingerprint: str
    this_run: RunFigures
    config: dict[str, Any]
    versions: dict[str, str | None]
    data: str
    retry: RetrySummary | None = None
