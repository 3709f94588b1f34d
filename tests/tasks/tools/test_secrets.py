"""MCP servers' secrets (tasks/tools/secrets.py): taken from the environment where the
server starts, scrubbed from error texts, refused when a written job lost them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.tasks.tools.test_toolbox import _counting, _starts, call, run
from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.tasks.tools.tool import ToolboxError
from thinkbatch.tasks.tools.toolbox import Toolbox


def test_mcp_secrets_come_from_the_environment_and_never_reach_error_texts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    secret = "sk-test-3f9a2b7c1d"
    monkeypatch.setenv("TB_TEST_API_KEY", secret)
    starts = tmp_path / "starts"
    rollout = _counting(starts, "${TB_TEST_API_KEY}")
    with Toolbox.open(rollout, tmp_path) as box:
        [refused] = run(box, [call("check_key")])
    assert _starts(starts) == [hashlib.sha256(secret.encode()).hexdigest()]  # it got the key
    assert refused.error == "Error executing tool check_key: key ********** refused"

    monkeypatch.delenv("TB_TEST_API_KEY")
    with pytest.raises(ToolboxError, match=r"rollout.tools\[0\] \(mcp .*\): env.API_KEY: "
                                           r"\$\{TB_TEST_API_KEY\} is not set in the environment"):
        Toolbox.open(rollout, tmp_path)
    # A job read back from a JSON dump (a manifest, Prefect's parameters) lost a literal
    # secret: refused, not started with the mask as its key.
    written = RolloutSpec.model_validate_json(_counting(starts, secret).model_dump_json())
    with pytest.raises(ToolboxError, match=r"env.STARTS_FILE: the value was not stored "
                                           r"\(thinkbatch writes no secret\); write it as"):
        Toolbox.open(written, tmp_path)
    assert len(_starts(starts)) == 1


def test_header_values_are_secrets_that_scale_out_must_name_from_the_environment():
    """A bearer token in `headers`: scrubbed from error texts (the whole value and the
    token alone), and a literal one cannot reach scale-out workers (a JSON dump masks it)."""
    from types import SimpleNamespace

    from thinkbatch.tasks.tools.secrets import Secrets, unsent

    def rollout(value: str) -> RolloutSpec:
        return RolloutSpec.model_validate({"tools": [
            {"mcp": {"url": "http://search:8000/mcp", "headers": {"Authorization": value}}}]})

    literal = rollout("Bearer tok-7c1d3f9a2b")
    scrubbed = Secrets.of([("at", literal.tools[0].mcp)]).scrub(
        "401: token tok-7c1d3f9a2b refused (Authorization: Bearer tok-7c1d3f9a2b)")
    assert scrubbed == "401: token ********** refused (Authorization: **********)"
    assert unsent(SimpleNamespace(rollout=literal)) == [
        "rollout.tools[0].mcp.headers.Authorization: with scale.workers > 1 a secret reaches "
        "the workers only from their environment: write it as ${VAR}"]
    assert unsent(SimpleNamespace(rollout=rollout("Bearer ${TB_TOKEN}"))) == []
