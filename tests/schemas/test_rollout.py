"""The `rollout` section's models: each tool source is exactly one kind, refused with a
message that names the place."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from thinkbatch.schemas.rollout import RolloutSpec


def test_defaults_and_sources():
    spec = RolloutSpec.model_validate({"tools": [
        {"python": "tools.py", "functions": ["get_weather"]},
        {"mcp": {"command": ["python", "server.py"], "env": {"X": "1"}}},
        {"mcp": {"url": "http://127.0.0.1:8765/mcp"}},
        {"recorded": {"column": "results"}}]})
    assert (spec.max_turns, spec.tool_timeout_s, spec.max_concurrent_tools) == (8, 30, 16)
    assert spec.recorded_column == "results"
    assert [s.label for s in spec.tools] == [
        "python tools.py", "mcp ['python', 'server.py']", "mcp http://127.0.0.1:8765/mcp",
        "recorded column results"]
    assert RolloutSpec.model_fields["max_concurrent_tools"].json_schema_extra == {
        "speed_only": True}


@pytest.mark.parametrize("rollout, where, message", [
    ({"tools": []}, "tools", "at least 1 item"),
    ({"tools": [{}]}, "tools.0", "exactly one of python, mcp, recorded; got none"),
    ({"tools": [{"python": "t.py", "recorded": {"column": "r"}}]}, "tools.0",
     "got ['python', 'recorded']"),
    ({"tools": [{"recorded": {"column": "r"}, "functions": ["f"]}]}, "tools.0",
     "functions picks tools of a python or mcp source"),
    ({"tools": [{"mcp": {}}]}, "tools.0.mcp", "set one of command"),
    ({"tools": [{"mcp": {"command": ["x"], "url": "http://h/mcp"}}]}, "tools.0.mcp",
     "set one of command"),
    ({"tools": [{"mcp": {"command": []}}]}, "tools.0.mcp.command", "at least 1 item"),
    ({"tools": [{"mcp": {"url": "h:80/mcp"}}]}, "tools.0.mcp.url", "pattern"),
    ({"tools": [{"mcp": {"url": "http://h/mcp", "env": {"A": "1"}}}]}, "tools.0.mcp",
     "env applies to a stdio command only"),
    ({"tools": [{"python": "t.py", "pyhton": "u.py"}]}, "tools.0.pyhton", "Extra inputs"),
    ({"tools": [{"recorded": {"column": "a"}}, {"recorded": {"column": "b"}}]}, "",
     "at most one recorded source"),
    ({"tools": [{"python": "t.py"}], "max_turns": 0}, "max_turns", "greater than or equal"),
    ({"tools": [{"python": "t.py"}], "tool_timeout_s": 0}, "tool_timeout_s", "greater than"),
])
def test_refused(rollout: dict[str, Any], where: str, message: str):
    with pytest.raises(ValidationError) as e:
        RolloutSpec.model_validate(rollout)
    [err] = e.value.errors()
    assert ".".join(map(str, err["loc"])) == where
    assert message in err["msg"]
