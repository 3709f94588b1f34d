"""Splitting raw completions into reasoning, answer and tool calls with vLLM's own
parsers, chosen by the names `vllm serve` takes (`--reasoning-parser kimi_k2`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from thinkbatch.schemas.job import ParserSpec
from thinkbatch.schemas.output import Status
from thinkbatch.tasks.engine import Generation


@dataclass(slots=True)
class Parsed:
    status: Status
    reasoning: str | None = None
    answer: str | None = None
    tool_calls: list[dict[str, str | None]] | None = None
    error: str | None = None
    reasoning_tokens: int | None = None


def parser_class(spec: ParserSpec, tokenizer: Any, model_name: str | None) -> Any:
    """The composed vLLM Parser class, validated against the tokenizer; None if no parser."""
    if not (spec.reasoning or spec.tool_call):
        return None
    from vllm.parser.parser_manager import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=spec.tool_call,
        reasoning_parser_name=spec.reasoning,
        enable_auto_tools=spec.tool_call is not None,
        model_name=model_name,
        tokenizer=tokenizer,
    )


def marker_strings(tokenizer: Any) -> list[str]:
    """Added tokens (think tags, tool-call markers...): none may leak into a column."""
    if tokenizer is None:
        return []
    return sorted(t for t in tokenizer.get_added_vocab() if len(t) > 1)


class OutputParser:
    def __init__(self, spec: ParserSpec, tokenizer: Any, model_name: str | None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.cls = parser_class(spec, tokenizer, model_name)
        self.markers = marker_strings(tokenizer) if self.cls else []
        self._requests: dict[str, Any] = {}

    def _request(self, tools: list[dict] | None) -> Any:
        """The request a parser consults: only its tools matter here, so one is built per
        distinct tool set (building one per row cost a third of the host path)."""
        key = json.dumps(tools, sort_keys=True) if tools else ""
        if key not in self._requests:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            self._requests[key] = ChatCompletionRequest.model_construct(
                model="thinkbatch", messages=[], tools=tools,
                tool_choice="auto" if tools else None, include_reasoning=True)
        return self._requests[key]

    def parse(self, gen: Generation, tools: list[dict] | None,
              chat_template_kwargs: dict[str, Any], json_schema: dict | None = None) -> Parsed:
        """`chat_template_kwargs` tells the parser whether thinking was on, so a
        non-thinking answer is not misfiled as reasoning."""
        parsed = self._split(gen, tools, chat_template_kwargs)
        if json_schema is not None and parsed.status is Status.OK:
            problem = schema_problem(parsed.answer, json_schema)
            if problem:
                parsed.status, parsed.error = Status.SCHEMA_ERROR, problem
        return parsed

    def _split(self, gen: Generation, tools: list[dict] | None,
               chat_template_kwargs: dict[str, Any]) -> Parsed:
        truncated = gen.finish_reason == "length"
        if self.cls is None:
            if truncated:
                return Parsed(Status.TRUNCATED, error="hit max_tokens")
            return Parsed(Status.OK, answer=gen.text)
        try:
            parser = self.cls(self.tokenizer, tools, chat_template_kwargs=chat_template_kwargs)
            if gen.prompt_token_ids is not None:
                parser.set_prompt_token_ids(gen.prompt_token_ids)
            reasoning, answer, calls = parser.parse(
                gen.text, self._request(tools),
                enable_auto_tools=self.spec.tool_call is not None,
                model_output_token_ids=gen.token_ids,
            )
            reasoning_tokens = parser.count_reasoning_tokens(gen.token_ids) if gen.token_ids else None
        except Exception as e:  # a parser bug or unparseable text: keep the row, say why
            return Parsed(Status.PARSE_ERROR, error=f"{type(e).__name__}: {e}")
        tool_calls = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                      for c in calls or []] or None
        if truncated:
            return Parsed(Status.TRUNCATED, reasoning=reasoning or None,
                          error="hit max_tokens before the answer was complete",
                          reasoning_tokens=reasoning_tokens)
        leak = self._leak(reasoning, answer, tool_calls)
        if leak:
            return Parsed(Status.PARSE_ERROR, reasoning=reasoning, answer=answer,
                          tool_calls=tool_calls, error=leak, reasoning_tokens=reasoning_tokens)
        return Parsed(Status.OK, reasoning=reasoning or None, answer=answer or None,
                      tool_calls=tool_calls, reasoning_tokens=reasoning_tokens)

    def _leak(self, reasoning: str | None, answer: str | None,
              tool_calls: list[dict[str, str | None]] | None) -> str | None:
        fields = {"reasoning": reasoning, "answer": answer}
        for i, c in enumerate(tool_calls or []):
            fields[f"tool_calls[{i}].name"] = c["name"]
            fields[f"tool_calls[{i}].arguments"] = c["arguments"]
        for name, text in fields.items():
            for m in self.markers:
                if text and m in text:
                    return f"marker {m!r} left in {name}: the output is not well formed"
        return None


def schema_problem(answer: str | None, schema: dict[str, Any]) -> str | None:
    """Why the answer is not a JSON document matching the schema, or None."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer or ""), schema)
    except json.JSONDecodeError as e:
        return f"answer is not JSON: {e.msg} at char {e.pos}"
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return f"answer does not match the JSON schema at {where}: {e.message}"
    return None
