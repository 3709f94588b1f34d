from __future__ import annotations

import json

import pyarrow as pa

from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.rows.read import ROW_ID, ROW_INDEX
from thinkbatch.tasks.rows.render import Renderer


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
    assert reqs[2].error == "prompt is blank: only whitespace"
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


WEATHER_CALL = {"id": "functions.get_weather:0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
AGENTIC = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
           {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21C"}]


def test_openai_tool_call_messages_are_valid_as_json_and_as_structs() -> None:
    (as_json,) = _render("messages", [json.dumps(AGENTIC)])
    assert as_json.error is None
    assert as_json.messages == [AGENTIC[0], {"role": "assistant", "tool_calls": [WEATHER_CALL]},
                                AGENTIC[2]]
    # A struct column has every field in every message, null where a message has none.
    (as_struct,) = _render("messages", [AGENTIC])
    assert as_struct.error is None and as_struct.messages == as_json.messages


def test_malformed_tool_calls_and_tool_messages_are_named() -> None:
    def with_call(**function) -> str:
        call = {"type": "function", "function": function}
        return json.dumps([AGENTIC[0], {"role": "assistant", "content": None,
                                        "tool_calls": [WEATHER_CALL, call]}])
    reqs = _render("messages", [
        with_call(arguments="{}"),
        with_call(name="get_weather", arguments="not json"),
        with_call(name="get_weather", arguments="[1]"),
        json.dumps([AGENTIC[0], {"role": "assistant", "content": None}]),
        json.dumps([*AGENTIC[:2], {"role": "tool", "content": "sunny"}]),
        json.dumps([{"role": "user", "content": "", "tool_calls": [WEATHER_CALL]}]),
        json.dumps([AGENTIC[0], {"role": "assistant", "content": None, "tool_calls": "x"}]),
    ])
    errors = [r.error for r in reqs]
    assert errors[0] == "messages[1].tool_calls[1].function.name is missing"
    assert errors[1] == errors[2] == "messages[1].tool_calls[1].function.arguments must be a JSON object"
    assert errors[3] == "messages[1].content must be a string (null only beside tool_calls)"
    assert errors[4] == "messages[2].tool_call_id is required in a tool message"
    assert errors[5] == "messages[0].tool_calls is only allowed in an assistant message"
    assert errors[6] == "messages[1].tool_calls must be a list"
    (empty_user,) = _render("messages", [json.dumps([{"role": "user", "content": " "}])])
    assert empty_user.error == "messages[0].content must be a non-empty string"


def test_tool_call_messages_reach_the_chat_template_through_vllms_chat_path() -> None:
    """The renderer `vllm.LLM` uses for `_preprocess_chat_one`, with the miniature's real
    tokenizer and chat template: the call and its result are in the prompt."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers import ChatParams
    from vllm.renderers.registry import renderer_from_config

    (req,) = _render("messages", [AGENTIC])
    config = EngineArgs(model="assets/tiny-kimi-thinking", max_model_len=1024)
    renderer = renderer_from_config(config.create_engine_config())
    _, prompt = renderer.render_messages(req.messages, ChatParams())
    text = renderer.tokenizer.decode(prompt["prompt_token_ids"])
    assert ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>') in text
    assert "## Return of functions.get_weather:0\nsunny, 21C<|im_end|>" in text


def test_a_per_row_n_is_refused_not_ignored() -> None:
    reqs = _render_rows([
        {"prompt": "a", "s": json.dumps({"n": 3})},
        {"prompt": "b", "s": json.dumps({"samples_per_prompt": 2})},
        {"prompt": "c", "s": json.dumps({"n": 1, "max_tokens": 5})},  # the job's n: fine
    ], sampling_column="s")
    refused = "sampling.n cannot differ per row; set sampling.n for the job"
    assert [r.error for r in reqs] == [refused, refused, None]
    assert reqs[2].sampling.max_tokens == 5


def test_binary_columns_are_read_as_utf8() -> None:
    job = load_job(inline={"input": {"path": "x", "sampling_column": "s"},
                           "engine": {"model": "m"}, "output": {"path": "o"}})
    batch = pa.RecordBatch.from_pydict({
        "prompt": pa.array(["héllo".encode(), b"\xff\xfe", None], pa.binary()),
        "s": pa.array([json.dumps({"max_tokens": 9}).encode(), None, None], pa.binary()),
        ROW_INDEX: [0, 1, 2], ROW_ID: ["r0", "r1", "r2"]})
    good, bad, null = Renderer(job).render_batch(batch)
    assert good.error is None and good.messages == [{"role": "user", "content": "héllo"}]
    assert good.sampling.max_tokens == 9
    assert bad.error == "prompt is not UTF-8 text: invalid start byte at byte 0"
    assert "null or empty" in null.error

    msgs = [json.dumps([{"role": "user", "content": "hi"}]).encode(), b"\x80"]
    a, b = _render("messages", pa.array(msgs, pa.binary()))
    assert a.error is None and a.messages == [{"role": "user", "content": "hi"}]
    assert b.error == "messages is not UTF-8 text: invalid start byte at byte 0"
    struct = pa.array([[{"role": b"user", "content": "ça va?".encode()}]],
                      pa.list_(pa.struct([("role", pa.binary()), ("content", pa.binary())])))
    (s,) = _render("messages", struct)
    assert s.error is None and s.messages == [{"role": "user", "content": "ça va?"}]
    (templated,) = _render_rows([{"city": "Zürich".encode()}],
                                prompt_template="Weather in {{ city }}?")
    assert templated.messages[-1]["content"] == "Weather in Zürich?"
