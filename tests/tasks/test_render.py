from __future__ import annotations

import json

import pyarrow as pa

from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.read import ROW_ID, ROW_INDEX
from thinkbatch.tasks.render import render_batch


def _render(column: str, values: list, **inp):
    job = load_job(inline={"input": {"path": "x", f"{column}_column": column, **inp},
                           "engine": {"model": "m"}, "output": {"path": "o"}})
    batch = pa.RecordBatch.from_pydict({
        column: values,
        ROW_INDEX: list(range(len(values))),
        ROW_ID: [f"r{i}" for i in range(len(values))],
    })
    return list(render_batch(job, batch))


def test_prompt_with_system_prompt() -> None:
    (req,) = _render("prompt", ["hello"], system_prompt="be brief")
    assert req.error is None
    assert req.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hello"}]


def test_bad_prompts_become_rows_with_reasons() -> None:
    reqs = _render("prompt", [None, "", "   ", "fine"])
    assert [r.error is not None for r in reqs] == [True, True, True, False]
    assert "null or empty" in reqs[0].error
    assert [r.row_id for r in reqs] == ["r0", "r1", "r2", "r3"]


def test_messages_as_json_and_as_structs() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    (a,) = _render("messages", [json.dumps(msgs)])
    (b,) = _render("messages", [msgs])
    assert a.messages == b.messages == msgs


def test_bad_messages_are_named() -> None:
    reqs = _render("messages", [
        "{not json",
        json.dumps([{"role": "wizard", "content": "x"}]),
        json.dumps([]),
        json.dumps([{"role": "system", "content": "only system"}]),
        json.dumps([{"role": "user", "content": None}]),
    ])
    errors = [r.error for r in reqs]
    assert "not valid JSON" in errors[0]
    assert "'wizard'" in errors[1]
    assert "non-empty list" in errors[2]
    assert "no user message" in errors[3]
    assert "content must be a non-empty string" in errors[4]
