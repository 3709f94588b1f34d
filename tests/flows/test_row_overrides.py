"""A row's own values that vLLM refuses fail that row only, through the real vLLM CPU
engine (shared, in-process): the job goes on and writes every row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import engine_section, job_dict, prompt_rows, write_prompts
from thinkbatch.flows.job import generate_dataset

pytestmark = pytest.mark.engine


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in ds.dataset(out / "data").to_table().to_pylist()}


def test_overrides_vllm_refuses_become_invalid_input_rows(tiny_model: str, prefect_harness,
                                                          tmp_path: Path) -> None:
    overrides = {
        1: ({"extra": {"bogus_field": 1}},
            "sampling.extra.bogus_field: not a vLLM SamplingParams field"),
        3: ({"top_k": -5}, "sampling.top_k: top_k must be 0 (disable), or at least 1, got -5."),
        4: ({"structured_outputs": {"regex": "(unclosed"}},
            "sampling.structured_outputs.regex: Failed to transform regex into a grammar"),
        5: ({"extra": {"stop_token_ids": [10**6]}},  # vLLM checks this one at add_request
            "VLLMValidationError: token_id(s) [1000000] in stop_token_ids contain out-of-vocab"),
        6: ({"n": 2}, "sampling.n cannot differ per row; set sampling.n for the job"),
        7: ({"extra": {"bogus_field": 1}},  # the same override again: the same verdict
            "sampling.extra.bogus_field: not a vLLM SamplingParams field"),
    }
    rows = prompt_rows(10)
    for i, r in enumerate(rows):
        r["sampling"] = json.dumps(overrides[i][0]) if i in overrides else None
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model),
                   input={"sampling_column": "sampling"})
    manifest = generate_dataset(job)
    got = _rows(tmp_path / "out")
    assert sorted(got) == [r["id"] for r in rows]  # every row written
    for i, r in enumerate(rows):
        row = got[r["id"]]
        if i in overrides:
            assert row["status"] == "invalid_input", row
            assert row["error"].startswith(overrides[i][1]), row["error"]
            assert row["completion_tokens"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None, row
    assert manifest.status_counts == {"ok": 4, "invalid_input": 6}


def test_openai_tool_call_conversations_generate(tiny_model: str, prefect_harness,
                                                 tmp_path: Path) -> None:
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"}]
    nameless = {**call, "function": {"arguments": "{}"}}
    rows = [{"id": "agentic", "topic": "t", "messages": json.dumps(turn)},
            {"id": "nameless", "topic": "t", "messages": json.dumps(
                [turn[0], {**turn[1], "tool_calls": [nameless]}, turn[2]])}]
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model),
                   input={"messages_column": "messages", "prompt_column": None})
    generate_dataset(job)
    got = _rows(tmp_path / "out")
    assert got["agentic"]["status"] == "ok" and got["agentic"]["prompt_tokens"] > 40
    assert got["nameless"]["status"] == "invalid_input"
    assert got["nameless"]["error"] == "messages[1].tool_calls[0].function.name is missing"
