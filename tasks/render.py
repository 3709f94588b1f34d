"""A row becomes a chat request, or a row-level error that names why. Never dropped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from thinkbatch.schemas.job import JobSpec
from thinkbatch.tasks.read import ROW_ID, ROW_INDEX

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(slots=True)
class RowRequest:
    row_index: int
    row_id: str
    passthrough: tuple[Any, ...]
    messages: list[dict[str, Any]] | None = None
    replay_text: str | None = None
    error: str | None = None  # set: the row is invalid_input, with this reason


class InvalidRow(ValueError):
    pass


def _messages_from_value(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRow("messages is null")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRow(f"messages is not valid JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(value, list) or not value:
        raise InvalidRow("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRow(f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRow(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
        if not isinstance(content, str) or (role == "user" and not content.strip()):
            raise InvalidRow(f"messages[{i}].content must be a non-empty string")
        out.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRow("messages has no user message")
    return out


def _messages_from_prompt(prompt: Any, system_prompt: str | None) -> list[dict[str, Any]]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRow("prompt is null or empty" if not prompt else "prompt is not a string")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def render_batch(job: JobSpec, batch: pa.RecordBatch) -> Iterator[RowRequest]:
    """Column-wise conversion once per batch, then one small object per row."""
    inp = job.input
    cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    passthrough = [cols[c] for c in inp.passthrough_columns]
    source = cols[inp.messages_column or inp.prompt_column]
    replay = cols[job.engine.replay_column] if job.engine.kind == "replay" else None
    for i, (row_index, row_id) in enumerate(zip(cols[ROW_INDEX], cols[ROW_ID])):
        req = RowRequest(row_index=row_index, row_id=row_id,
                         passthrough=tuple(c[i] for c in passthrough))
        try:
            if row_id is None:
                req.row_id = f"row:{row_index}"
                raise InvalidRow(f"id column {inp.id_column!r} is null")
            if inp.messages_column:
                req.messages = _messages_from_value(source[i])
            else:
                req.messages = _messages_from_prompt(source[i], inp.system_prompt)
            if replay is not None:
                if replay[i] is None:
                    raise InvalidRow(f"replay column {job.engine.replay_column!r} is null")
                req.replay_text = replay[i]
        except InvalidRow as e:
            req.error = str(e)
        yield req
