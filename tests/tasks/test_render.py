from __future__ import annotations

import json

import pyarrow as pa

from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.read import ROW_ID, ROW_INDEX
from thinkbatch.tasks.render import Renderer


def _render(column: str, values: list, **inp):
    job = load_job(inline={"input": {"path": "x", f"{column}_column": column, **inp},
                           "engine": {"model": "m"}, "output": {"path": "o"}})
    batch = pa.RecordBatch.from_pydict({
        column: values,
        ROW_INDEX: list(range(len(values))),
        ROW_ID: [f"r{i}" for i in range(len(values))],
    })
    return list(Renderer(job).render_batch(batch))


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


def _render_rows(rows: list[dict], **inp):
    job = load_job(inline={"input": {"path": "x", **inp}, "engine": {"model": "m"},
                           "sampling": {"temperature": 0.5, "max_tokens": 100},
                           "chat_template_kwargs": {"thinking": True},
                           "output": {"path": "o"}})
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    batch = pa.RecordBatch.from_pydict({**cols, ROW_INDEX: list(range(len(rows))),
                                        ROW_ID: [f"r{i}" for i in range(len(rows))]})
    return list(Renderer(job).render_batch(batch))


def test_per_row_overrides_merge_over_job_defaults() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    reqs = _render_rows([
        {"prompt": "a", "s": json.dumps({"max_tokens": 7}), "t": json.dumps(tools),
         "k": json.dumps({"thinking": False})},
        {"prompt": "b", "s": None, "t": None, "k": None},
    ], sampling_column="s", tools_column="t", chat_template_kwargs_column="k")
    a, b = reqs
    assert a.error is None and a.sampling.max_tokens == 7 and a.sampling.temperature == 0.5
    assert a.tools == tools and a.chat_template_kwargs == {"thinking": False}
    assert b.sampling is None and b.tools is None and b.chat_template_kwargs == {"thinking": True}


def test_invalid_overrides_fail_the_row_and_name_the_field() -> None:
    reqs = _render_rows([
        {"prompt": "a", "s": json.dumps({"temperature": -1})},
        {"prompt": "b", "s": json.dumps({"bogus": 1})},
        {"prompt": "c", "s": "{oops"},
        {"prompt": "d", "s": json.dumps({"temperature": -1})},  # cached verdict, same words
    ], sampling_column="s")
    assert "sampling.temperature" in reqs[0].error
    assert "sampling.bogus" in reqs[1].error
    assert "not valid JSON" in reqs[2].error
    assert reqs[3].error == reqs[0].error
    (bad_tools,) = _render_rows([{"prompt": "a", "t": json.dumps([{"name": "x"}])}],
                                tools_column="t")
    assert "tools[0]" in bad_tools.error


def test_prompt_template_over_columns_names_row_and_column() -> None:
    reqs = _render_rows([{"city": "Paris", "day": "monday"}, {"city": None, "day": "x"}],
                        prompt_template="Weather in {{ city }} on {{ day | title }}?",
                        system_prompt="be brief")
    assert reqs[0].messages[-1] == {"role": "user", "content": "Weather in Paris on Monday?"}
    assert reqs[0].messages[0]["role"] == "system"
    assert "column 'city'" in reqs[1].error and "'r1'" in reqs[1].error
    (broken,) = _render_rows([{"n": 0}], prompt_template="{{ 10 / n }}")
    assert "row 'r0'" in broken.error and "ZeroDivisionError" in broken.error
