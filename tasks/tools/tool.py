"""What a tool is to the toolbox, whichever source serves it (tools/python.py,
tools/mcp.py): an OpenAI function schema, where it comes from, and a call on the
toolbox's event loop. A call that fails raises `ToolFailed` with the whole text the model
reads; a source that cannot be opened raises `ToolboxError`. The shapes the sources share
live here so that the toolbox imports its sources and no source imports the toolbox."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel


class ToolboxError(RuntimeError):
    """A tool source that cannot be opened (or a closed toolbox): the job is refused
    before the model loads."""


class ToolFailed(Exception):
    """A call failed; the message is the whole text the model sees."""


class Slot(Protocol):
    """The slot a call runs in (tools/slots.py): a tool whose work outlives its call (a
    thread) holds it until the work ends, with the release `hold` returns."""

    def hold(self) -> Callable[[], None]: ...


@dataclass(frozen=True, slots=True)
class Tool:
    schema: dict[str, Any]  # OpenAI function tool
    source: str  # where it comes from, for messages
    # On the toolbox's loop, in the slot the toolbox took for it (tools/slots.py).
    call: Callable[[dict[str, Any], Slot], Awaitable[str]]
    # Why its source is down for good (an MCP server that could not be restarted); None
    # while it serves.
    down: Callable[[], str | None] = lambda: None
    # Stops what the source keeps running (worker processes), on the toolbox's loop at close.
    close: Callable[[], Awaitable[None]] | None = None


def function_schema(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


def untitled(schema: Any) -> Any:
    """Without pydantic's generated `title`s (`City`, `get_weatherArguments`): they tell
    the model nothing and cost prompt tokens. Property names are kept, even `title`."""
    if isinstance(schema, list):
        return [untitled(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(
                value, dict):
            out[key] = {k: untitled(v) for k, v in value.items()}
        else:
            out[key] = untitled(value)
    return out


def as_text(value: Any) -> str:
    """A tool's return value as the tool message: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, ensure_ascii=False, default=str)
