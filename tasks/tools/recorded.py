"""Recorded tool results: a rollout's tools answered from an input column instead of run,
for deterministic re-runs and tests. The renderer reads a row's column with
`parse_recorded` (a bad value refuses the row up front); the toolbox answers each call
from it with `recorded_result`."""

from __future__ import annotations

import json
from typing import Any

from thinkbatch.tasks.tools.tool import ToolFailed, as_text


def parse_recorded(value: Any) -> dict[str, Any]:
    """A row's recorded results as {call id or tool name: result}: a JSON object text,
    a struct (dict) or a map (list of pairs) of an Arrow column; null is no results.
    Raises ValueError for any other shape (a reader can refuse the row up front)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"recorded results are not valid JSON: {e}") from None
    if isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                       for p in value):
        value = dict(value)
    if not isinstance(value, dict):
        raise ValueError("recorded results must be an object {call id or tool name: result}, "
                         f"not {type(value).__name__}")
    return value


def recorded_result(recorded: Any, call_id: str, name: str) -> str:
    """The result recorded for the call's id, else for its tool name."""
    try:
        table = parse_recorded(recorded)
    except ValueError as e:
        raise ToolFailed(f"error: {e}") from None
    for key in (call_id, name):
        if table.get(key) is not None:
            return as_text(table[key])
    raise ToolFailed(f"error: no recorded result for call {call_id!r} of tool {name!r}")
