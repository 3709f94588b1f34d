"""vLLM's parsers through OutputParser, and the check that the columns hold the whole
completion: each test runs with both of the miniature's tokenizers, its Hugging Face one
and one of Kimi-K2-Thinking's class (markers only in tiktoken's special table)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from miniature.tiny_model import SPECIAL_TOKENS
from tests.conftest import TOKENIZERS, tokenizer_engine
from thinkbatch.schemas.job import ParserSpec
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import Generation
from thinkbatch.tasks.rows.parse import OutputParser

KIMI = ParserSpec(reasoning="kimi_k2", tool_call="kimi_k2")
CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "paris"}<|tool_call_end|><|tool_calls_section_end|>')


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    """Both tokenizers, as vLLM loads them for the engine."""
    from vllm.tokenizers import get_tokenizer

    out = {}
    for name in TOKENIZERS:
        engine = tokenizer_engine(name)
        out[name] = get_tokenizer(engine["model"],
                                  trust_remote_code=engine.get("trust_remote_code", False))
    return out


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request, tokenizers: dict):
    return tokenizers[request.param]


def _gen(text: str, finish: str = "stop", token_ids: Sequence[int] = ()) -> Generation:
    return Generation(key="0:0", text=text, token_ids=token_ids, finish_reason=finish,
                      prompt_token_ids=None, ttft_s=None, latency_s=None)


def _parse(tokenizer, text: str, finish: str = "stop", spec: ParserSpec = KIMI, **ctk):
    """The text as the model writes it: the markers as their control tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return OutputParser(spec, tokenizer, "tiny").parse(_gen(text, finish, ids), None, ctk)


def test_reasoning_and_answer_are_separated(tokenizer) -> None:
    p = _parse(tokenizer, "<think>two plus two</think>The answer is 4.")
    assert (p.status, p.reasoning, p.answer, p.tool_calls) == (
        Status.OK, "two plus two", "The answer is 4.", None)


def test_tool_call_is_extracted_with_kimi_id(tokenizer) -> None:
    p = _parse(tokenizer, "<think>need weather</think>" + CALL)
    assert p.status is Status.OK
    assert p.reasoning == "need weather"
    assert p.answer is None
    assert p.tool_calls == [{"id": "functions.get_weather:0", "name": "get_weather",
                             "arguments": '{"city": "paris"}'}]


def test_truncated_keeps_reasoning_and_drops_answer(tokenizer) -> None:
    p = _parse(tokenizer, "<think>still thinking about", finish="length")
    assert p.status is Status.TRUNCATED
    assert p.reasoning == "still thinking about"
    assert p.answer is None


def test_leaked_marker_is_a_parse_error(tokenizer) -> None:
    p = _parse(tokenizer, "<think>a</think>answer <|tool_call_end|> junk")
    assert p.status is Status.PARSE_ERROR
    assert "<|tool_call_end|>" in p.error


def test_thinking_off_is_all_answer(tokenizer) -> None:
    p = _parse(tokenizer, "just the answer", thinking=False)
    assert (p.status, p.reasoning, p.answer) == (Status.OK, None, "just the answer")


def test_no_parser_keeps_text_as_answer(tokenizer) -> None:
    p = _parse(tokenizer, "<think>x</think>y", spec=ParserSpec())
    assert (p.status, p.answer) == (Status.OK, "<think>x</think>y")


def _call(args: str, n: int = 0) -> str:
    return (f"<|tool_call_begin|>functions.get_weather:{n}<|tool_call_argument_begin|>{args}"
            "<|tool_call_end|>")


def _section(*calls: str) -> str:
    return "<|tool_calls_section_begin|>" + "".join(calls) + "<|tool_calls_section_end|>"


@pytest.mark.parametrize("args, why", [
    ("{city: paris", "tool_calls[0].arguments is not JSON: Expecting property name"),
    ('{"city": "x"} extra', "tool_calls[0].arguments is not JSON: Extra data"),
    ("[1, 2]", "tool_calls[0].arguments is not a JSON object"),
])
def test_arguments_that_are_not_a_json_object_are_a_parse_error(tokenizer, args, why) -> None:
    p = _parse(tokenizer, "<think>a</think>" + _section(_call(args)))
    assert p.status is Status.PARSE_ERROR and p.error.startswith(why)
    assert p.tool_calls[0]["arguments"] == args  # the columns are kept as parsed


@pytest.mark.parametrize("text, dropped", [
    ("<think>a</think>b" + _section(_call('{"city": "x"}')) + "trailing text", "trailing text"),
    ("<think>a</think>" + _section(_call('{"city": "x"}'), "between", _call('{"city": "y"}', 1)),
     "between"),
    ("<think>a</think>b" + _section(_call('{"city": "x"}')) + "<think>more</think>", "more"),
    ("<think>a</think>" + _section("<|tool_call_begin|>no id<|tool_call_argument_begin|>{}"
                                   "<|tool_call_end|>"), "no id"),
])
def test_text_the_parser_drops_is_a_parse_error_that_quotes_it(tokenizer, text, dropped) -> None:
    p = _parse(tokenizer, text)
    assert p.status is Status.PARSE_ERROR
    assert p.error == f"the parser dropped text from the completion: {dropped!r}"


def test_dropped_text_is_quoted_up_to_80_characters(tokenizer) -> None:
    p = _parse(tokenizer, "<think>a</think>b" + _section(_call("{}")) + "x" * 200)
    assert p.error == f"the parser dropped text from the completion: {'x' * 80 + '…'!r}"


@pytest.mark.parametrize("text, marker, where", [
    ("<think>a</think>answer </think> more", "</think>", "answer"),
    ("<think>a<think>b</think>c", "<think>", "reasoning"),
])
def test_a_marker_the_parser_deletes_is_a_parse_error(tokenizer, text, marker, where) -> None:
    p = _parse(tokenizer, text)
    assert p.status is Status.PARSE_ERROR
    assert p.error.startswith(f"the parser deleted marker {marker!r} from inside {where}")


@pytest.mark.parametrize("text", [
    "<think>a</think></think>b",  # twice between two parts
    "<think></think>a</think>",  # a think tag twice in all
    "<think>a</think>b" + _section(_call("{}")) + "</think>",
    "<think>a</think>" + _section(_call("{}")) + "<|tool_calls_section_end|>",
])
def test_a_marker_more_often_than_the_structure_has_room_for_is_a_parse_error(
        tokenizer, text) -> None:
    p = _parse(tokenizer, text)
    assert p.status is Status.PARSE_ERROR and p.error.startswith("marker '<")


@pytest.mark.parametrize("text, reasoning", [
    ("<think>only thinking</think>", "only thinking"),
    ("thinking that never closed", "thinking that never closed"),
    ("<think>a</think>\n\n", "a"),
    ("", None),
])
def test_no_answer_and_no_tool_call_is_no_answer_with_reasoning_kept(
        tokenizer, text, reasoning) -> None:
    p = _parse(tokenizer, text)
    assert (p.status, p.reasoning, p.tool_calls) == (Status.NO_ANSWER, reasoning, None)
    assert p.error == "finished without an answer or a tool call"


def test_empty_completion_without_parser_is_no_answer(tokenizer) -> None:
    assert _parse(tokenizer, " ", spec=ParserSpec()).status is Status.NO_ANSWER


@pytest.mark.parametrize("text, thinking, calls", [
    ("<think>two plus two</think>The answer is 4.", True, 0),
    ("<think>weather</think>" + _section(_call('{"city": "x"}')), True, 1),
    ("<think>weather</think>Let me look.\n" + _section(
        _call('{"city": "x"}'), _call("", 1)), True, 2),
    ("<think>t</think>k", True, 0),  # a short answer that is also inside a marker
    ("just the answer", False, 0),
    ("let me look" + _section(_call('{"city": "x"}')), False, 1),
])
def test_well_formed_completions_stay_ok(tokenizer, text, thinking, calls) -> None:
    p = _parse(tokenizer, text, thinking=thinking)
    assert (p.status, p.error) == (Status.OK, None)
    assert len(p.tool_calls or ()) == calls


def test_both_tokenizers_give_the_same_ids_and_columns(tokenizers: dict) -> None:
    """A completion is the same ids with either tokenizer (each marker one control token),
    and the parse the same columns and reasoning tokens, counted from those ids."""
    texts = ["<think>two plus two</think>The answer is 4.", "<think>weather</think>" + CALL,
             "<think>a</think>answer <|tool_call_end|> junk", "<think>still thinking about"]
    hf, tiktoken = (tokenizers[name] for name in TOKENIZERS)
    control = set(hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert tiktoken.encode(text, add_special_tokens=False) == ids
        assert sum(i in control for i in ids) == text.count("<")  # each marker one id
        assert _parse(hf, text) == _parse(tiktoken, text)
        assert _parse(tiktoken, text).reasoning_tokens is not None
