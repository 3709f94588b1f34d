"""The `rollout` section's models: each tool source is exactly one kind, refused with a
message that names the place."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from thinkbatch.schemas.job import SPEED_ONLY
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
    assert "rollout.max_concurrent_tools" in SPEED_ONLY
    assert (spec.context.policy, spec.context.budget_tokens) == ("stop", None)


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
    ({"tools": [{"mcp": {"command": ["x"], "headers": {"A": "b"}}}]}, "tools.0.mcp",
     "headers apply to a url only"),
    ({"tools": [{"mcp": {"command": ["x"], "max_restarts": -1}}]},
     "tools.0.mcp.max_restarts", "greater than or equal"),
    ({"tools": [{"python": "t.py"}], "max_tool_error_rate": 0}, "max_tool_error_rate",
     "greater than 0"),
    ({"tools": [{"mcp": {"command": ["x"]}, "isolated": True}]}, "tools.0",
     "isolated applies to a python source only"),
    ({"tools": [{"mcp": {"url": "http://h/mcp", "env": {"A": "1"}}}]}, "tools.0.mcp",
     "env applies to a stdio command only"),
    ({"tools": [{"python": "t.py", "pyhton": "u.py"}]}, "tools.0.pyhton", "Extra inputs"),
    ({"tools": [{"recorded": {"column": "a"}}, {"recorded": {"column": "b"}}]}, "",
     "at most one recorded source"),
    ({"tools": [{"python": "t.py"}], "max_turns": 0}, "max_turns", "greater than or equal"),
    ({"tools": [{"python": "t.py"}], "tool_timeout_s": 0}, "tool_timeout_s", "greater than"),
    ({"tools": [{"python": "t.py"}], "context": {"policy": "summarize"}}, "context.policy",
     "'stop' or 'hide_tool_results'"),
    ({"tools": [{"python": "t.py"}], "context": {"budget_tokens": 100}}, "context",
     "apply to policy hide_tool_results"),
    ({"tools": [{"python": "t.py"}], "context": {"policy": "hide_tool_results",
                                                 "keep_last": -1}}, "context.keep_last",
     "greater than or equal"),
])
def test_refused(rollout: dict[str, Any], where: str, message: str):
    with pytest.raises(ValidationError) as e:
        RolloutSpec.model_validate(rollout)
    [err] = e.value.errors()
    assert ".".join(map(str, err["loc"])) == where
    assert message in err["msg"]


def test_fields_added_later_are_dumped_only_when_set():
    """`headers`, `max_restarts` and `isolated` came later: at their defaults a source dumps as it did
    before them, so the resume fingerprint of an output written then is unchanged; set,
    they count, header values masked as secrets."""
    old = {"command": ["python", "server.py"], "env": {"X": "${X}"}}
    spec = RolloutSpec.model_validate({"tools": [{"mcp": old}]})
    assert spec.model_dump(mode="json")["tools"][0] == {
        "python": None, "mcp": {**old, "url": None}, "recorded": None, "functions": None}
    assert RolloutSpec.model_validate({"tools": [{"python": "t.py", "isolated": True}]}
                                      ).model_dump()["tools"][0]["isolated"] is True
    spec = RolloutSpec.model_validate({"tools": [
        {"mcp": {**old, "max_restarts": 0}},
        {"mcp": {"url": "http://h/mcp", "headers": {"Authorization": "Bearer tok-secret-1",
                                                    "X-Team": "${TEAM}"}}}],
        "max_tool_error_rate": 0.2})
    dumped = [s["mcp"] for s in spec.model_dump(mode="json")["tools"]]
    assert dumped[0]["max_restarts"] == 0 and "headers" not in dumped[0]
    assert dumped[1]["headers"] == {"Authorization": "**********", "X-Team": "${TEAM}"}
    assert "rollout.max_tool_error_rate" in SPEED_ONLY
