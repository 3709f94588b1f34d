"""The output table's schema, defined once; everything else derives from it."""

from __future__ import annotations

from enum import Enum

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


# Rows that never had a completion: nothing to re-parse, so a replay keeps them as stored.
NO_COMPLETION = frozenset({Status.INVALID_INPUT, Status.PROMPT_TOO_LONG, Status.ENGINE_ERROR})


TOOL_CALL = pa.struct(
    [("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())]
)

# Order is the column order of every part file. `row_index` (the row's position in the
# plan) and `sample_index` are the key of exactly-once and of resume.
BASE_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("reasoning", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("tool_calls", pa.list_(TOOL_CALL)),
    pa.field("finish_reason", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("reasoning_tokens", pa.int32()),
    pa.field("ttft_s", pa.float64()),
    pa.field("latency_s", pa.float64()),
    # The row's effective template kwargs as JSON when it overrode the job's: the parser
    # needs them (thinking on/off) and `reparse` reads them back.
    pa.field("chat_template_kwargs", pa.string()),
    pa.field("raw_text", pa.string()),
]
BASE_NAMES = frozenset(f.name for f in BASE_FIELDS)


def output_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Base fields with the passthrough columns (typed as in the input) after the keys."""
    extra = list(passthrough) if passthrough is not None else []
    clash = [f.name for f in extra if f.name in BASE_NAMES]
    if clash:
        raise ValueError(f"passthrough columns clash with output columns: {clash}")
    return pa.schema(BASE_FIELDS[:3] + extra + BASE_FIELDS[3:])
