"""`reparse` keeps what the raw text alone cannot tell: a row's own template kwargs and
the status of a row that never had a completion. Replay engine only (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds

from tests.conftest import job_dict, prompt_rows, write_prompts
from thinkbatch.flows.job import generate_dataset
from thinkbatch.tasks.jobs.reparse import reparse_job


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in ds.dataset(out / "data").to_table().to_pylist()}


def test_reparse_keeps_a_rows_thinking_off_and_a_stored_invalid_input(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    rows = prompt_rows(3)
    rows[0].update(raw_text="<think>sum</think>answer four", ctk=None)
    rows[1].update(raw_text="answer yes", ctk=json.dumps({"thinking": False}))
    rows[2].update(raw_text="<think>x</think>y", ctk=None, prompt=None)
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   {"kind": "replay", "tokenizer": tiny_model},
                   input={"chat_template_kwargs_column": "ctk"},
                   output={"keep_raw_text": True})
    generate_dataset(job)
    first = _rows(tmp_path / "out")
    assert (first["q00001"]["status"], first["q00001"]["answer"]) == ("ok", "answer yes")
    assert json.loads(first["q00001"]["chat_template_kwargs"]) == {"thinking": False}
    assert first["q00000"]["chat_template_kwargs"] is None  # the job's own kwargs
    assert first["q00002"]["status"] == "invalid_input"

    again = reparse_job(str(tmp_path / "out"), str(tmp_path / "re"), "kimi_k2", "kimi_k2")
    generate_dataset(again)
    got = _rows(tmp_path / "re")
    assert sorted(got) == sorted(first)
    assert (got["q00000"]["reasoning"], got["q00000"]["answer"]) == ("sum", "answer four")
    off = got["q00001"]
    assert (off["status"], off["reasoning"], off["answer"]) == ("ok", None, "answer yes")
    assert off["chat_template_kwargs"] == first["q00001"]["chat_template_kwargs"]
    invalid = got["q00002"]
    assert (invalid["status"], invalid["error"]) == ("invalid_input", first["q00002"]["error"])
    assert invalid["error"] == "prompt is null or empty"


def test_a_stored_truncated_row_stays_truncated_when_replayed(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    """Cut-off text can parse as a whole answer; the stored status says it was cut off."""
    rows = prompt_rows(2)
    rows[0].update(raw_text="<think>long sum</think>answer fo", status="truncated")
    rows[1].update(raw_text="<think>sum</think>answer four", status="ok")
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   {"kind": "replay", "tokenizer": tiny_model},
                   input={"status_column": "status"})
    generate_dataset(job)
    got = _rows(tmp_path / "out")
    assert got["q00000"]["status"] == "truncated"
    assert got["q00000"]["finish_reason"] == "length"
    assert got["q00000"]["reasoning"] == "long sum"
    assert got["q00001"]["status"] == "ok"
