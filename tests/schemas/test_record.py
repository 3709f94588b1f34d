from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.schemas.output import ROW_TIME_NAMES, Status, output_schema
from thinkbatch.schemas.plan import Plan
from thinkbatch.schemas.record import (Generation, Parsed, RowRequest, Trajectory, Turn,
                                       output_row)


def _job(**output):
    return load_job(inline={"input": {"path": "in", "passthrough_columns": ["topic"]},
                            "engine": {"model": "m"}, "chat_template_kwargs": {"thinking": True},
                            "output": {"path": "out", **output}})


STARTED = 1_700_000_000.25


def _gen(text: str = "<think>hm</think>4") -> Generation:
    return Generation(key="7:1", text=text, token_ids=(1, 2, 3), finish_reason="stop",
                      prompt_token_ids=(9,) * 5, ttft_s=0.1, latency_s=0.5,
                      started_at=STARTED, finished_at=STARTED + 0.5)


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, timezone.utc)


REQ = RowRequest(row_index=7, row_id="q7", passthrough=("maths",),
                 chat_template_kwargs={"thinking": True})


def test_a_row_has_every_output_column_and_fits_the_schema() -> None:
    row = output_row(_job(), REQ, 1, Parsed(Status.OK, reasoning="hm", answer="4"), _gen(),
                     worker="node-3")
    schema = output_schema(pa.schema([("topic", pa.string())]))
    assert sorted(row) == sorted(schema.names)
    table = pa.Table.from_pylist([row], schema=schema)
    assert table.num_rows == 1
    assert row == {
        "id": "q7", "row_index": 7, "sample_index": 1, "topic": "maths", "reasoning": "hm",
        "answer": "4", "tool_calls": None, "finish_reason": "stop", "status": "ok",
        "error": None, "prompt_tokens": 5, "completion_tokens": 3, "reasoning_tokens": None,
        "ttft_s": 0.1, "latency_s": 0.5, "started_at": _utc(STARTED),
        "finished_at": _utc(STARTED + 0.5), "worker": "node-3",
        "chat_template_kwargs": None, "raw_text": None}
    assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert table.column("finished_at").cast(pa.int64())[0].as_py() == 1_700_000_000_750_000


def test_rows_not_generated_have_no_times_nor_worker() -> None:
    replayed = _gen()
    replayed.started_at = replayed.finished_at = None  # a replay (reparse) generates nothing
    for gen in (replayed, None):
        row = output_row(_job(), REQ, 0, Parsed(Status.OK), gen, worker="node-3")
        assert (row["started_at"], row["finished_at"], row["worker"]) == (None, None, None)


def test_a_rollout_row_spans_its_conversation() -> None:
    job = load_job(inline={"input": {"path": "in"}, "engine": {"model": "m"},
                           "output": {"path": "out"},
                           "rollout": {"tools": [{"recorded": {"column": "results"}}]}})
    parsed = Parsed(Status.OK, answer="4")
    turns = [Turn.of(_gen(), parsed), Turn.of(_gen(), parsed)]
    trajectory = Trajectory([], turns, 30.0, started_at=STARTED, finished_at=STARTED + 31)
    row = output_row(job, REQ, 0, parsed, _gen(), trajectory, worker="node-3")
    assert (row["started_at"], row["finished_at"], row["worker"]) == (
        _utc(STARTED), _utc(STARTED + 31), "node-3")


def test_an_output_begun_without_row_times_is_written_without_them() -> None:
    """Parts of an output planned by an older version lack these columns; its new parts
    must too, or a glob over its parts no longer reads as one table."""
    legacy = output_schema(row_times=False)
    assert set(output_schema().names) - set(legacy.names) == ROW_TIME_NAMES
    row = output_row(_job(), REQ, 0, Parsed(Status.OK), _gen(), worker="node-3")
    assert pa.Table.from_pylist([row], schema=legacy).schema == legacy
    stored = Plan(files=[], shards=[], total_rows=0, fingerprint="f", fingerprint_parts={})
    assert Plan.model_validate_json(stored.model_dump_json(exclude={"row_times"})).row_times \
        is False


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
