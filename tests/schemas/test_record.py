from __future__ import annotations

import json

import pyarrow as pa

from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.schemas.output import Status, output_schema
from thinkbatch.schemas.record import Generation, Parsed, RowRequest, output_row


def _job(**output):
    return load_job(inline={"input": {"path": "in", "passthrough_columns": ["topic"]},
                            "engine": {"model": "m"}, "chat_template_kwargs": {"thinking": True},
                            "output": {"path": "out", **output}})


def _gen(text: str = "<think>hm</think>4") -> Generation:
    return Generation(key="7:1", text=text, token_ids=(1, 2, 3), finish_reason="stop",
                      prompt_token_ids=(9,) * 5, ttft_s=0.1, latency_s=0.5)


REQ = RowRequest(row_index=7, row_id="q7", passthrough=("maths",),
                 chat_template_kwargs={"thinking": True})


def test_a_row_has_every_output_column_and_fits_the_schema() -> None:
    row = output_row(_job(), REQ, 1, Parsed(Status.OK, reasoning="hm", answer="4"), _gen())
    schema = output_schema(pa.schema([("topic", pa.string())]))
    assert sorted(row) == sorted(schema.names)
    assert pa.Table.from_pylist([row], schema=schema).num_rows == 1
    assert row | {"ttft_s": None, "latency_s": None} == {
        "id": "q7", "row_index": 7, "sample_index": 1, "topic": "maths", "reasoning": "hm",
        "answer": "4", "tool_calls": None, "finish_reason": "stop", "status": "ok",
        "error": None, "prompt_tokens": 5, "completion_tokens": 3, "reasoning_tokens": None,
        "ttft_s": None, "latency_s": None, "chat_template_kwargs": None, "raw_text": None}


def test_raw_text_and_own_template_kwargs_are_kept_only_where_needed() -> None:
    failed = output_row(_job(), REQ, 0, Parsed(Status.PARSE_ERROR, error="x"), _gen())
    assert failed["raw_text"] == "<think>hm</think>4"
    kept = output_row(_job(keep_raw_text=True), REQ, 0, Parsed(Status.OK), _gen())
    assert kept["raw_text"] == "<think>hm</think>4"
    own = RowRequest(row_index=7, row_id="q7", passthrough=("maths",),
                     chat_template_kwargs={"thinking": False})
    assert output_row(_job(), own, 0, Parsed(Status.OK), _gen())["chat_template_kwargs"] == \
        '{"thinking": false}'
    never_ran = output_row(_job(keep_raw_text=True), own, 0,
                           Parsed(Status.INVALID_INPUT, error="bad"), None)
    assert {k: never_ran[k] for k in ("raw_text", "chat_template_kwargs", "prompt_tokens",
                                      "finish_reason", "status", "error")} == {
        "raw_text": None, "chat_template_kwargs": None, "prompt_tokens": None,
        "finish_reason": None, "status": "invalid_input", "error": "bad"}


def test_markers_and_manifests_are_written_as_before() -> None:
    """Earlier outputs resume from their markers, and tools read manifests: the same JSON
    as the dicts written before, with figures that do not apply to a run left out."""
    stats = {"rows": 2, "status": {"ok": 2}, "prompt_tokens": 6, "completion_tokens": 9,
             "parts": ["shard-000000-ab.parquet"]}
    assert ShardStats(**stats).to_json() == json.dumps(stats).encode()
    run = {"shards": [0], "rows_generated": 2, "output_tokens": 9, "engine_load_s": 1.5,
           "generation_s": 2.0, "engine_restarts": 0, "resumed": False, "wall_s": 3.0,
           "rows_per_s": 1.0, "output_tokens_per_s": 4.5, "orphan_parts_removed": 0}
    manifest = {"job": "j", "rows": 2, "input_rows": 2, "status_counts": {"ok": 2},
                "prompt_tokens": 6, "completion_tokens": 9, "shards": 1, "fingerprint": "f",
                "this_run": run, "config": {"name": "j", "tools": None},
                "versions": {"python": "3.11.9", "vllm": None}, "data": "out/data"}
    assert Manifest.model_validate(manifest).to_json(indent=2) == \
        json.dumps(manifest, indent=2).encode()
    workers = {"worker_rounds": [{"w0": "COMPLETED"}], "rows_generated": 2, "resumed": False,
               "wall_s": 3.0, "rows_per_s": 1.0, "output_tokens_per_s": 0.0,
               "orphan_parts_removed": 0}
    again = manifest | {"this_run": workers}
    assert json.loads(Manifest.model_validate(again).to_json()) == again
