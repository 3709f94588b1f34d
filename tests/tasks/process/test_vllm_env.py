"""vLLM's log lines at thinkbatch's default level: warnings, and the few lines that say
how an engine load goes (a run's stderr shows them: tests/flows/test_orphans.py)."""

from __future__ import annotations

import logging

import pytest

from thinkbatch.tasks.process.vllm_env import LEVEL_ENV, LoadLines


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.v1.core.kv_cache_utils", level, "f.py", 1, msg, (), None)


KV = "%s KV cache size: %s tokens, Maximum concurrency for %s tokens per request: %.2fx"
CHATTY = "Initializing a V1 LLM engine (v%s) with config: %s"


def test_the_default_level_shows_the_load_and_kv_cache_lines_and_warnings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    shown = LoadLines()
    assert shown.filter(_record(logging.INFO, KV))
    assert shown.filter(_record(logging.INFO, "Loading weights took %.2f seconds"))
    assert shown.filter(_record(logging.WARNING, "anything"))
    assert not shown.filter(_record(logging.INFO, CHATTY))
    assert not shown.filter(_record(logging.DEBUG, KV))


@pytest.mark.parametrize("level, chatty, kv", [("INFO", True, True), ("ERROR", False, False)])
def test_the_level_asked_for_wins(monkeypatch: pytest.MonkeyPatch, level: str, chatty: bool,
                                  kv: bool) -> None:
    monkeypatch.setenv(LEVEL_ENV, level)
    shown = LoadLines()
    assert shown.filter(_record(logging.INFO, CHATTY)) is chatty
    assert shown.filter(_record(logging.INFO, KV)) is kv
