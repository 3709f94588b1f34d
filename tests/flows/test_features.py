"""Dataset-generation features through the real vLLM CPU engine (shared, in-process)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_prompts
from thinkbatch.flows.job import generate_dataset

pytestmark = pytest.mark.engine


def _rows(out: Path) -> list[dict]:
    return ds.dataset(out / "data").to_table().to_pylist()


def _words_of_tokens(model: str, n: int) -> str:
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(model)
    words = "word " * n
    while len(tok.encode(words)) > n:
        words = words[:-5]
    return words


def test_n_samples_are_rows_with_sample_index_and_reproducible_seeds(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    write_prompts(tmp_path / "in.parquet", prompt_rows(12))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "a", engine_section(tiny_model),
                   sampling={"samples_per_prompt": 3})
    generate_dataset(job)
    first = {(r["id"], r["sample_index"]): r for r in _rows(tmp_path / "a")}
    assert sorted(first) == sorted((f"q{i:05d}", s) for i in range(12) for s in range(3))
    texts = [(r["reasoning"], r["answer"], json.dumps(r["tool_calls"])) for r in first.values()]
    assert len(set(texts)) > 12  # samples differ
    job["output"]["path"] = str(tmp_path / "b")
    generate_dataset(job)
    again = {(r["id"], r["sample_index"]): r for r in _rows(tmp_path / "b")}
    for key, row in first.items():  # same seed per sample: the same sample again
        assert (again[key]["reasoning"], again[key]["answer"]) == (row["reasoning"], row["answer"])


def test_per_row_sampling_thinking_and_structured_outputs(tiny_model: str, prefect_harness,
                                                           tmp_path: Path) -> None:
    rows = prompt_rows(6)
    overrides = [{"max_tokens": 4},
                 {"structured_outputs": {"regex": "answer (yes|no)"}},
                 None, None, {"temperature": -3}, None]
    ctk = [None, {"thinking": False}, None, None, None, None]
    for r, o, k in zip(rows, overrides, ctk):
        r["sampling"] = json.dumps(o) if o else None
        r["ctk"] = json.dumps(k) if k else None
    rows[3]["prompt"] = _words_of_tokens(tiny_model, 900)  # leaves less room than max_tokens
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model),
                   input={"sampling_column": "sampling", "chat_template_kwargs_column": "ctk"})
    manifest = generate_dataset(job)
    got = {r["id"]: r for r in _rows(tmp_path / "out")}
    short, choice, normal, long, invalid = (got[f"q{i:05d}"] for i in range(5))
    assert short["status"] == "truncated" and short["completion_tokens"] <= 4
    assert short["answer"] is None
    assert choice["status"] == "ok" and choice["reasoning"] is None  # thinking off per row
    assert choice["answer"] in ("answer yes", "answer no")
    assert normal["status"] == "ok" and normal["reasoning"]
    # The regex may make the grammar spell the think markers as plain text, which vLLM's
    # id-based count does not see; exact counts are asserted on the trained model.
    assert 0 <= normal["reasoning_tokens"] <= normal["completion_tokens"]
    # Its prompt leaves less room than max_tokens 256: it gets the room (counted), not
    # prompt_too_long.
    assert long["status"] in ("ok", "truncated")
    assert 0 < long["completion_tokens"] <= 1024 - long["prompt_tokens"] < 256
    assert manifest.this_run.turns_capped == 1
    assert invalid["status"] == "invalid_input" and "sampling.temperature" in invalid["error"]
    assert manifest.status_counts["ok"] == 3 + (long["status"] == "ok")


def test_json_schema_answers_are_validated_and_reparse_uses_other_parsers(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rows = prompt_rows(3)
    texts = ['<think>count</think>{"n": 3}', '<think>count</think>{"n": "three"}',
             "<think>count</think>not json"]
    for r, t in zip(rows, texts):
        r["raw_text"] = t
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   {"kind": "replay", "tokenizer": tiny_model},
                   sampling={"structured_outputs": {"json": schema}},
                   output={"keep_raw_text": True})
    generate_dataset(job)
    got = {r["id"]: r for r in _rows(tmp_path / "out")}
    assert got["q00000"]["status"] == "ok" and got["q00000"]["answer"] == '{"n": 3}'
    assert got["q00001"]["status"] == "schema_error" and "at n" in got["q00001"]["error"]
    assert got["q00002"]["status"] == "schema_error" and "not JSON" in got["q00002"]["error"]
    assert got["q00001"]["raw_text"] == texts[1]

    r = subprocess.run([*CLI, "reparse", str(tmp_path / "out"), "--to", str(tmp_path / "re"),
                        "--reasoning-parser", "deepseek_r1", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = {(r["id"], r["sample_index"]): r for r in _rows(tmp_path / "re")}
    assert sorted(again) == [(f"q{i:05d}", 0) for i in range(3)]
    assert again[("q00000", 0)]["reasoning"] == "count"
    assert again[("q00000", 0)]["topic"] == rows[0]["topic"]
