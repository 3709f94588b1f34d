"""The records one row passes through: a request (render), a generation (engine), a
parse (parse), and the output row they make together (`output_row`).

Kept here, free of vLLM and of any stage's code, so each stage and its tests import the
shapes without importing each other."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from thinkbatch.schemas.job import JobSpec, SamplingSpec
from thinkbatch.schemas.output import OutputRow, Status


@dataclass(slots=True)
class RowRequest:
    row_index: int
    row_id: str
    passthrough: tuple[Any, ...]
    messages: list[dict[str, Any]] | None = None
    replay_text: str | None = None
    sampling: SamplingSpec | None = None  # the row's own, when it overrides the job's
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_index: int | None = None  # replay of stored outputs: the stored sample index
    error: str | None = None  # set: the row is invalid_input, with this reason
    status: Status = Status.INVALID_INPUT  # the status of a row with `error` (replay: as stored)
    allow_special_tokens: bool = False  # the job trusts data that spells control tokens
    replay_finish_reason: str = "stop"  # replay of a stored truncated row: "length"


@dataclass(slots=True)
class Generation:
    key: str  # the caller's request key
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None
    prompt_token_ids: Sequence[int] | None
    ttft_s: float | None
    latency_s: float | None


@dataclass(slots=True)
class Parsed:
    status: Status
    reasoning: str | None = None
    answer: str | None = None
    tool_calls: list[dict[str, str | None]] | None = None
    error: str | None = None
    reasoning_tokens: int | None = None


def output_row(job: JobSpec, req: RowRequest, sample: int, parsed: Parsed,
               gen: Generation | None) -> dict[str, Any]:
    """One finished sample of a row as the committer writes it; `gen` is None for a row
    that never reached the engine (its `parsed` says why). Raw text is kept when the job
    asks or the parse failed, so the row can be inspected or re-parsed."""
    keep_raw = gen is not None and (
        job.output.keep_raw_text or parsed.status in (Status.PARSE_ERROR, Status.SCHEMA_ERROR))
    # A row's own template kwargs (thinking off...) are kept: re-parsing needs them.
    own_kwargs = gen is not None and req.chat_template_kwargs != job.chat_template_kwargs
    row = OutputRow(
        id=req.row_id,
        row_index=req.row_index,
        sample_index=sample,
        reasoning=parsed.reasoning,
        answer=parsed.answer,
        tool_calls=parsed.tool_calls,
        finish_reason=gen.finish_reason if gen else None,
        status=parsed.status.value,
        error=parsed.error,
        prompt_tokens=len(gen.prompt_token_ids) if gen and gen.prompt_token_ids is not None else None,
        completion_tokens=len(gen.token_ids) if gen and gen.token_ids else None,
        reasoning_tokens=parsed.reasoning_tokens,
        ttft_s=gen.ttft_s if gen else None,
        latency_s=gen.latency_s if gen else None,
        chat_template_kwargs=json.dumps(req.chat_template_kwargs) if own_kwargs else None,
        raw_text=gen.text if keep_raw else None,
    )
    return {**dict(zip(job.input.passthrough_columns, req.passthrough)), **row.as_dict()}
