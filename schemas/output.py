"""The output table's schema, defined once; everything else derives from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import Enum
from typing import Any

import pyarrow as pa


class Status(str, Enum):
    OK = "ok"
    TRUNCATED = "truncated"  # hit max_tokens: reasoning kept, answer null
    PARSE_ERROR = "parse_error"  # raw text kept, error says why
    NO_ANSWER = "no_answer"  # finished without an answer or a tool call: reasoning kept
    SCHEMA_ERROR = "schema_error"  # the answer does not match the row's JSON schema
    INVALID_INPUT = "invalid_input"  # the row could not become a request
    PROMPT_TOO_LONG = "prompt_too_long"  # prompt + max_tokens exceed max_model_len
    ENGINE_ERROR = "engine_error"  # the engine failed this request
    MAX_TURNS = "max_turns"  # a rollout still called tools after rollout.max_turns turns
    TOOL_ERROR = "tool_error"  # a rollout called a tool whose source is down for good


# Rows that never had a completion: nothing to re-parse, so a replay keeps them as stored.
NO_COMPLETION = frozenset({Status.INVALID_INPUT, Status.PROMPT_TOO_LONG, Status.ENGINE_ERROR})


TOOL_CALL = pa.struct(
    [("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())]
)
TOOL_RESULT = pa.struct([("call_id", pa.string()), ("name", pa.string()),
                         ("content", pa.string()), ("error", pa.string()),
                         ("latency_s", pa.float64())])
TURN = pa.struct([("reasoning", pa.string()), ("answer", pa.string()),
                  ("tool_calls", pa.list_(TOOL_CALL)), ("tool_results", pa.list_(TOOL_RESULT)),
                  ("completion_tokens", pa.int32()), ("finish_reason", pa.string())])


# Timestamps in UTC microseconds: Parquet's TIMESTAMP(isAdjustedToUTC, MICROS), which
# DuckDB, polars, pandas and Spark read as instants with no convention to know.
TIMESTAMP = pa.timestamp("us", tz="UTC")


def _column(arrow: pa.DataType, nullable: bool = True) -> Any:
    return field(metadata={"arrow": arrow, "nullable": nullable})


def _rollout_column(arrow: pa.DataType) -> Any:
    return field(default=None, metadata={"arrow": arrow, "nullable": True, "rollout": True})


@dataclass(slots=True)
class OutputRow:
    """The base columns of one output row: the one place they are named, each with its
    Arrow type. Order is the column order of every part file. `row_index` (the row's
    position in the plan) and `sample_index` are the key of exactly-once and of resume."""

    id: str = _column(pa.string(), nullable=False)
    row_index: int = _column(pa.int64(), nullable=False)
    sample_index: int = _column(pa.int32(), nullable=False)
    reasoning: str | None = _column(pa.string())
    answer: str | None = _column(pa.string())
    tool_calls: list[dict[str, str | None]] | None = _column(pa.list_(TOOL_CALL))
    finish_reason: str | None = _column(pa.string())
    status: str = _column(pa.string(), nullable=False)
    error: str | None = _column(pa.string())
    prompt_tokens: int | None = _column(pa.int32())
    completion_tokens: int | None = _column(pa.int32())
    reasoning_tokens: int | None = _column(pa.int32())
    ttft_s: float | None = _column(pa.float64())
    latency_s: float | None = _column(pa.float64())
    # When the row entered the engine (a rollout: its first turn's submit) and when it
    # finished, and the process that generated it (its flow run's name): the report's
    # throughput and engine occupancy over time come from these, not from commit times.
    started_at: datetime | None = _column(TIMESTAMP)
    finished_at: datetime | None = _column(TIMESTAMP)
    worker: str | None = _column(pa.string())
    # The row's effective template kwargs as JSON when it overrode the job's: the parser
    # needs them (thinking on/off) and `reparse` reads them back.
    chat_template_kwargs: str | None = _column(pa.string())
    raw_text: str | None = _column(pa.string())
    # Rollout jobs only (`rollout` set): the whole conversation, one row per conversation.
    # Single-turn outputs do not have these columns, so their parts keep one schema.
    turns: list[dict[str, Any]] | None = _rollout_column(pa.list_(TURN))
    messages: str | None = _rollout_column(pa.string())  # the trajectory, OpenAI JSON
    num_turns: int | None = _rollout_column(pa.int32())
    tool_calls_total: int | None = _rollout_column(pa.int32())  # tools run
    tool_errors: int | None = _rollout_column(pa.int32())  # tools run that failed

    def as_dict(self, rollout: bool = False) -> dict[str, Any]:
        """The row as `pa.Table.from_pylist` takes it."""
        return {f.name: getattr(self, f.name)
                for f in (BASE_FIELDS + ROLLOUT_FIELDS if rollout else BASE_FIELDS)}


def _arrow_fields(rollout: bool) -> list[pa.Field]:
    return [pa.field(f.name, f.metadata["arrow"], f.metadata["nullable"])
            for f in fields(OutputRow) if f.metadata.get("rollout", False) == rollout]


BASE_FIELDS: list[pa.Field] = _arrow_fields(rollout=False)
ROLLOUT_FIELDS: list[pa.Field] = _arrow_fields(rollout=True)
BASE_NAMES = frozenset(f.name for f in BASE_FIELDS)
# Columns an output gets only when its plan says it was started with them (`Plan.row_times`):
# an output begun by an older version goes on without them, so all its parts share one
# schema (DuckDB's `read_parquet` of a glob refuses parts that differ).
ROW_TIME_NAMES = frozenset({"started_at", "finished_at", "worker"})
ROLLOUT_NAMES = frozenset(f.name for f in ROLLOUT_FIELDS)


def output_schema(passthrough: pa.Schema | None = None, rollout: bool = False,
                  row_times: bool = True) -> pa.Schema:
    """Base fields with the passthrough columns (typed as in the input) after the keys;
    a rollout job's columns last. Without `row_times`, as outputs were written before
    rows kept their times (ROW_TIME_NAMES)."""
    extra = list(passthrough) if passthrough is not None else []
    clash = [f.name for f in extra if f.name in BASE_NAMES | (ROLLOUT_NAMES if rollout else set())]
    if clash:
        raise ValueError(f"passthrough columns clash with output columns: {clash}")
    base = [f for f in BASE_FIELDS if row_times or f.name not in ROW_TIME_NAMES]
    return pa.schema(base[:3] + extra + base[3:] + (ROLLOUT_FIELDS if rollout else []))
