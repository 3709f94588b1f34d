"""The records one row passes through: a request (render), a generation (engine), a
parse (parse), and the output row they make together (`output_row`).

Kept here, free of vLLM and of any stage's code, so each stage and its tests import the
shapes without importing each other."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
    min_room_tokens: int = 16  # the job's sampling.min_room_tokens (a row's own is in sampling)
    replay_finish_reason: str = "stop"  # replay of a stored truncated row: "length"
    recorded: Any = None  # rollout: the row's recorded tool results (rollout.tools recorded)
    prompt: Any = None  # rollout: this turn's prompt, rendered ahead (tasks/rows/history.py)


@dataclass(slots=True)
class Generation:
    key: str  # the caller's request key
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None
    prompt_token_ids: Sequence[int] | None
    ttft_s: float | None
    latency_s: float | None
    capped: bool = False  # max_tokens was cut to the room the prompt left in the context
    started_at: float | None = None  # Unix time the request entered the engine
    finished_at: float | None = None  # Unix time it finished


@dataclass(slots=True)
class Parsed:
    status: Status
    reasoning: str | None = None
    answer: str | None = None
    tool_calls: list[dict[str, str | None]] | None = None
    error: str | None = None
    reasoning_tokens: int | None = None


@dataclass(slots=True)
class Turn:
    """One assistant turn of a rollout: its parse, what is read of its generation, and the
    results of the tools it called (None when none ran: an answer, or tool calls past
    max_turns). Token counts, not ids: a conversation open for hundreds of turns would
    hold each turn's whole prompt (turns x history)."""

    parsed: Parsed
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    ttft_s: float | None
    results: list[ToolResult] | None = None

    @classmethod
    def of(cls, gen: Generation, parsed: Parsed) -> Turn:
        return cls(parsed,
                   len(gen.prompt_token_ids) if gen.prompt_token_ids is not None else None,
                   len(gen.token_ids) if gen.token_ids else None,
                   gen.finish_reason, gen.ttft_s)

    def state(self) -> dict[str, Any]:
        """The turn as JSON data, for an open conversation's saved state (`of_state`)."""
        p = self.parsed
        return {"status": p.status.value, "reasoning": p.reasoning, "answer": p.answer,
                "tool_calls": p.tool_calls, "error": p.error,
                "reasoning_tokens": p.reasoning_tokens, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "ttft_s": self.ttft_s,
                "results": ([[r.call_id, r.name, r.content, r.error, r.latency_s]
                             for r in self.results] if self.results is not None else None)}

    @classmethod
    def of_state(cls, d: dict[str, Any]) -> Turn:
        parsed = Parsed(Status(d["status"]), d["reasoning"], d["answer"], d["tool_calls"],
                        d["error"], d["reasoning_tokens"])
        return cls(parsed, d["prompt_tokens"], d["completion_tokens"], d["finish_reason"],
                   d["ttft_s"], [ToolResult(*r) for r in d["results"]]
                   if d["results"] is not None else None)

    def as_struct(self) -> dict[str, Any]:
        """The turn as an element of the `turns` column."""
        return {"reasoning": self.parsed.reasoning, "answer": self.parsed.answer,
                "tool_calls": self.parsed.tool_calls,
                "tool_results": ([{"call_id": r.call_id, "name": r.name, "content": r.content,
                                   "error": r.error, "latency_s": r.latency_s}
                                  for r in self.results] if self.results is not None else None),
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason}


@dataclass(slots=True)
class Trajectory:
    """A finished rollout conversation: its messages in OpenAI chat format (the input's,
    then each assistant turn and tool result), its turns, its wall time, and when its
    first turn was submitted and it ended (Unix times)."""

    messages: list[dict[str, Any]]
    turns: list[Turn]
    latency_s: float
    started_at: float | None = None
    finished_at: float | None = None


def _total(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _instant(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, timezone.utc)


def output_row(job: JobSpec, req: RowRequest, sample: int, parsed: Parsed,
               gen: Generation | None, trajectory: Trajectory | None = None,
               worker: str | None = None) -> dict[str, Any]:
    """One finished sample of a row as the committer writes it; `gen` is None for a row
    that never reached the engine (its `parsed` says why). Raw text is kept when the job
    asks or the parse failed, so the row can be inspected or re-parsed.

    A rollout row (`trajectory`; gen and parsed are its last turn's) counts the tokens of
    all its turns: prompt tokens as the engine was asked to read them (before prefix
    caching), the first turn's time to first token, the conversation's wall time, from
    its first turn's submit to its end. `worker` names the process that generated it
    (none for a row that was not generated: a replay's)."""
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
        started_at=_instant(gen.started_at) if gen else None,
        finished_at=_instant(gen.finished_at) if gen else None,
        worker=None,  # once the row's times are known: a replay generated nothing
        chat_template_kwargs=json.dumps(req.chat_template_kwargs) if own_kwargs else None,
        raw_text=gen.text if keep_raw else None,
    )
    if trajectory is not None:
        _fill_rollout(row, trajectory)
    row.worker = worker if row.started_at is not None else None
    return {**dict(zip(job.input.passthrough_columns, req.passthrough)),
            **row.as_dict(rollout=job.rollout is not None)}


def _fill_rollout(row: OutputRow, trajectory: Trajectory) -> None:
    turns = trajectory.turns
    results = [r for t in turns for r in t.results or ()]
    row.turns = [t.as_struct() for t in turns]
    row.messages = json.dumps(trajectory.messages, ensure_ascii=False)
    row.num_turns = len(turns)
    row.tool_calls_total = len(results)
    row.tool_errors = sum(r.error is not None for r in results)
    row.prompt_tokens = _total([t.prompt_tokens for t in turns])
    row.completion_tokens = _total([t.completion_tokens for t in turns])
    row.reasoning_tokens = _total([t.parsed.reasoning_tokens for t in turns])
    row.ttft_s = turns[0].ttft_s if turns else None
    row.latency_s = trajectory.latency_s
    row.started_at = _instant(trajectory.started_at)
    row.finished_at = _instant(trajectory.finished_at)


@dataclass(slots=True)
class ToolResult:
    """One tool call's outcome (tasks/tools/). `content` is what the model reads as the
    tool message: the result text, or the error text when the call failed (`error` then
    holds the same text); a failed tool is not a failed row."""

    call_id: str
    name: str
    content: str
    error: str | None
    latency_s: float
