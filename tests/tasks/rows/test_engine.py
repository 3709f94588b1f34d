"""The vLLM engine on the miniature, in-process on the suite's shared engine."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import engine_section
from thinkbatch.schemas.job import EngineSpec, ParserSpec
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import Generation, RowRequest
from thinkbatch.tasks.rows.engine import RequestRejected, get_engine
from thinkbatch.tasks.rows.parse import OutputParser

KIMI = ParserSpec(reasoning="kimi_k2", tool_call="kimi_k2")
LEFT_BEHIND_S = 60  # a closed engine's processes that live longer were left behind


def _request(engine: Any, i: int, prompt_len: int) -> RowRequest:
    """A row whose rendered prompt is about `prompt_len` tokens long (not more)."""
    overhead = len(engine._render([{"role": "user", "content": ""}], None, {})[
        "prompt_token_ids"])
    assert overhead < prompt_len
    per_word = len(engine.tokenizer.encode("word " * 100, add_special_tokens=False)) / 100
    words = int((prompt_len - overhead) / per_word)
    while len(engine.tokenizer.encode("word " * words, add_special_tokens=False)) > \
            prompt_len - overhead:
        words -= 1
    text = "word " * words
    return RowRequest(i, f"r{i}", (), messages=[{"role": "user", "content": text}])


def _run(engine: Any, reqs: dict[str, RowRequest], params: Any) -> dict[str, Generation]:
    for key, req in reqs.items():
        engine.submit(key, req, params)
    done: dict[str, Generation] = {}
    while engine.in_flight:
        done |= {g.key: g for g in engine.poll()}
    return done


@pytest.mark.engine
def test_the_jobs_vllm_engine_arguments_reach_vllm_as_they_are(tiny_model: str) -> None:
    """Written flat under `engine:` (the random-miniature preset's), each vLLM engine
    argument is in the configuration vLLM built from them."""
    spec = EngineSpec(**engine_section(tiny_model))
    assert spec.vllm_args == {"kv_cache_memory_bytes": 268435456, "enforce_eager": True,
                              "load_format": "dummy",
                              "structured_outputs_config": {"enable_in_reasoning": True}}
    config = get_engine(spec, KIMI).llm.llm_engine.vllm_config
    assert config.cache_config.kv_cache_memory_bytes == 268435456
    assert config.model_config.enforce_eager is True
    assert config.load_config.load_format == "dummy"
    assert config.structured_outputs_config.enable_in_reasoning is True


@pytest.mark.engine
def test_max_tokens_is_cut_to_the_room_left_and_refused_only_under_the_floor(
        tiny_model: str) -> None:
    """A prompt that leaves less room than max_tokens gets the room (and finishes
    `length`: truncated), one that leaves less than sampling.min_room_tokens (16) is
    prompt_too_long; the shared SamplingParams keeps its max_tokens."""
    from vllm import SamplingParams

    engine = get_engine(EngineSpec(**engine_section(tiny_model)), KIMI)
    window = engine.max_model_len
    params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    reqs = {"short": _request(engine, 0, 200), "near": _request(engine, 1, window - 40)}

    done = _run(engine, reqs, params)

    short, near = done["short"], done["near"]
    assert (len(short.token_ids), short.capped) == (64, False)
    room = window - len(near.prompt_token_ids)
    assert 16 <= room < 64
    assert (len(near.token_ids), near.finish_reason, near.capped) == (room, "length", True)
    assert params.max_tokens == 64
    parsed = OutputParser(KIMI, engine.tokenizer, None).parse(near, None, {})
    assert parsed.status is Status.TRUNCATED
    full = _request(engine, 2, window - 4)
    assert window - len(engine._render(full.messages, None, {})["prompt_token_ids"]) < 16
    with pytest.raises(RequestRejected) as refused:
        engine.submit("full", full, params)
    assert refused.value.status is Status.PROMPT_TOO_LONG
    assert "under sampling.min_room_tokens 16" in str(refused.value)
    assert not engine.in_flight


def test_closing_the_engine_ends_its_processes_without_waiting_out_vllms_grace(
        tiny_model: str) -> None:
    """Last in this file: it closes the file's engine. On the CPU build vLLM's worker
    outlasts vLLM's own 5 s grace, so a close that waited it out took 5 s each run."""
    import psutil

    from thinkbatch.tasks.rows.engine import drop_engine

    engine = get_engine(EngineSpec(**engine_section(tiny_model)), KIMI)
    # This engine's processes, not every child of this test process: another file's
    # engine in the same pytest worker lives on, and is not this close's to end.
    cores = [psutil.Process(p.pid) for p in engine._manager().processes]
    processes = cores + [c for core in cores for c in core.children(recursive=True)]
    assert any(p.name().startswith("VLLM") for p in processes), [p.name() for p in processes]
    started = time.monotonic()
    drop_engine(engine)
    took = time.monotonic() - started
    assert took < 4, took
    # Gone, not gone within 5 s: on 2 loaded cores vLLM's worker took longer than that to
    # exit after a close that returned in time. A process left behind never exits.
    gone, alive = psutil.wait_procs(processes, timeout=LEFT_BEHIND_S)
    assert not alive, alive
