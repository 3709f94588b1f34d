from __future__ import annotations

import pytest

from thinkbatch.schemas.job import ParserSpec
from thinkbatch.schemas.output import Status
from thinkbatch.tasks.engine import Generation
from thinkbatch.tasks.parse import OutputParser

KIMI = ParserSpec(reasoning="kimi_k2", tool_call="kimi_k2")
CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "paris"}<|tool_call_end|><|tool_calls_section_end|>')


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str):
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(tiny_model)


def _gen(text: str, finish: str = "stop") -> Generation:
    return Generation(key="0:0", text=text, token_ids=(), finish_reason=finish,
                      prompt_token_ids=None, ttft_s=None, latency_s=None)


def _parse(tokenizer, text: str, finish: str = "stop", spec: ParserSpec = KIMI, **ctk):
    return OutputParser(spec, tokenizer, "tiny").parse(
        _gen(text, finish), None, ctk)


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
