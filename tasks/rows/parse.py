"""Splitting raw completions into reasoning, answer and tool calls with vLLM's own
parsers, chosen by the names `vllm serve` takes (`--reasoning-parser kimi_k2`).

vLLM's parse is the source of the columns; a row is `ok` only if those columns hold the
whole completion. That is checked against the raw text without knowing the format: the
pieces the parser returned are traced through the text in order, and what is left must
be markers and whitespace, each marker no more often than the structure has room for.
The markers are the tokenizer's control tokens and the parsers' own marker names, looked
up in its vocabulary: Kimi-K2-Thinking's tokenizer lists `<think>` nowhere else.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from itertools import accumulate
from typing import Any

from thinkbatch.schemas.job import ParserSpec
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import Generation, Parsed
from thinkbatch.tasks.rows.prompt_tokens import control_tokens

NO_ANSWER = "finished without an answer or a tool call"


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


def _strings(obj: Any, *names: str) -> set[str]:
    """The attributes `names` of a parser that are set to text."""
    out = set()
    for name in names:
        try:
            value = getattr(obj, name, None)
        except NotImplementedError:  # a base parser's property its subclass did not set
            continue
        if isinstance(value, str) and value:
            out.add(value)
    return out


def parser_markers(cls: Any, tokenizer: Any) -> tuple[set[str], set[str]]:
    """The markers the composed parser splits on, by the names the parsers give them, and
    those of them it looks for as token ids (a parser engine's `token_id_terminals`), which
    the vocabulary must have as one token each. From a parser built for the tokenizer: an
    engine parser's config, else a reasoning parser's start and end strings."""
    parser = cls(tokenizer, None, chat_template_kwargs={})
    named: set[str] = set()
    needed: set[str] = set()
    for part in (parser, getattr(parser, "_reasoning_parser", None),
                 getattr(parser, "_tool_parser", None)):
        config = (getattr(part, "parser_engine_config", None)
                  or getattr(getattr(part, "_parser_engine", None), "parser_engine_config", None))
        if config is not None:
            named |= set(config.terminal_literals)
            needed |= set(config.token_id_terminals.values())
        elif part is not None:
            named |= _strings(part, "reasoning_start_str", "reasoning_end_str")
    return named, needed


class MarkersMissing(ValueError):
    """The tokenizer lacks a marker the chosen parsers look for as one token."""


def _parser_names(spec: ParserSpec) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (("reasoning", spec.reasoning),
                                             ("tool_call", spec.tool_call)) if v)


class OutputParser:
    def __init__(self, spec: ParserSpec, tokenizer: Any, model_name: str | None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.cls = parser_class(spec, tokenizer, model_name)
        named, needed = (parser_markers(self.cls, tokenizer)
                         if self.cls and tokenizer is not None else (set(), set()))
        vocab = tokenizer.get_vocab() if named else {}
        lacking = sorted(needed - vocab.keys())  # looked up by name, as vLLM's parsers do
        if lacking:
            raise MarkersMissing(
                f"parsers ({_parser_names(spec)}) look for {', '.join(map(repr, lacking))} as "
                f"one token, which the tokenizer of {model_name!r} does not have: the model "
                "does not write the format these parsers read")
        # The control tokens and the parsers' markers the vocabulary has: none may leak
        # into a column, and the engine tokenizes them as text in data (VllmEngine.guard).
        found = {*control_tokens(tokenizer, named), *(named & vocab.keys())} \
            if self.cls and tokenizer is not None else set()
        self.markers = sorted(m for m in found if len(m) > 1)
        # Longest first, so no marker hides a longer one that starts the same way.
        self._marker_re = re.compile("({})".format("|".join(
            re.escape(m) for m in sorted(self.markers, key=len, reverse=True)) or "(?!)"))
        self._marker_starts = sorted({m[0] for m in self.markers})
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
              chat_template_kwargs: dict[str, Any]) -> Parsed:
        """`chat_template_kwargs` tells the parser whether thinking was on, so a
        non-thinking answer is not misfiled as reasoning. The structured outputs' schema
        is checked by the caller, which knows whether this is a final answer
        (rows/conversation.py)."""
        truncated = gen.finish_reason == "length"
        if self.cls is None:
            if truncated:
                return Parsed(Status.TRUNCATED, error="hit max_tokens")
            if not gen.text.strip():
                return Parsed(Status.NO_ANSWER, error=NO_ANSWER)
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
        problem = (self._untraced(gen.text, reasoning, answer, tool_calls)
                   or arguments_problem(tool_calls))
        if problem:
            return Parsed(Status.PARSE_ERROR, reasoning=reasoning, answer=answer,
                          tool_calls=tool_calls, error=problem, reasoning_tokens=reasoning_tokens)
        if not tool_calls and not (answer and answer.strip()):
            return Parsed(Status.NO_ANSWER, reasoning=reasoning or None, answer=answer or None,
                          error=NO_ANSWER, reasoning_tokens=reasoning_tokens)
        return Parsed(Status.OK, reasoning=reasoning or None, answer=answer or None,
                      tool_calls=tool_calls, reasoning_tokens=reasoning_tokens)

    def _leak(self, reasoning: str | None, answer: str | None,
              tool_calls: list[dict[str, str | None]] | None) -> str | None:
        """A marker inside a column: the parser did not recognise the structure."""
        fields = {"reasoning": reasoning, "answer": answer}
        for i, c in enumerate(tool_calls or []):
            fields[f"tool_calls[{i}].name"] = c["name"]
            fields[f"tool_calls[{i}].arguments"] = c["arguments"]
        for name, text in fields.items():
            if text and (m := self._marker_re.search(text)):
                return f"marker {m.group()!r} left in {name}: the output is not well formed"
        return None

    def _untraced(self, raw: str, reasoning: str | None, answer: str | None,
                  tool_calls: list[dict[str, str | None]] | None) -> str | None:
        """What in the raw text no column accounts for, or None when nothing is.

        The returned pieces are found in order in the text between markers; skipped text
        must be whitespace. A piece not found so either holds a marker (a leak), or had one
        deleted from inside it (found once markers are removed), or was rewritten by the
        parser (found nowhere): that row is then judged on leaks and arguments only."""
        segs = self._split_at_markers(raw)
        texts, marks = segs[0::2], segs[1::2]  # marks[k] lies between texts[k] and texts[k+1]
        gaps: list[list[str]] = []  # the markers before each traced piece, then the rest
        first_call = None
        i = at = 0  # the cursor: texts[i][at:]
        for name, piece in _pieces(reasoning, answer, tool_calls):
            k, j = _find(texts, i, at, piece)
            skipped = _skipped(texts, i, at, k, j)
            if piece == "{}" and (k < 0 or skipped):
                continue  # parsers report empty arguments as {}
            if k < 0:
                return (self._leak(reasoning, answer, tool_calls)
                        or _deleted_marker(texts, marks, i, at, piece, name))
            if skipped:
                return _dropped(skipped)
            if first_call is None and name.startswith("tool_calls"):
                first_call = len(gaps)
            gaps.append(marks[i:k])
            i, at = k, j + len(piece)
        rest = _skipped(texts, i, at, -1, -1)
        if rest:
            return _dropped(rest)
        gaps.append(marks[i:])
        return _crowded(gaps, first_call, len(tool_calls or ()))

    def _split_at_markers(self, raw: str) -> list[str]:
        """`self._marker_re.split(raw)`: texts at even indexes, markers at odd ones. Found
        with str.find of the markers' first characters and a match anchored there: about
        three times faster than the regex scanning every character of a long reasoning."""
        spans: list[tuple[int, int]] = []
        for c in self._marker_starts:
            p = raw.find(c)
            while p >= 0:
                m = self._marker_re.match(raw, p)
                if m:
                    spans.append(m.span())
                p = raw.find(c, m.end() if m else p + 1)
        out: list[str] = []
        cut = 0
        for start, end in sorted(spans):
            if start >= cut:  # not inside the marker before it
                out += (raw[cut:start], raw[start:end])
                cut = end
        out.append(raw[cut:])
        return out


def _pieces(reasoning: str | None, answer: str | None,
            tool_calls: list[dict[str, str | None]] | None) -> list[tuple[str, str]]:
    """The parser's output in the order it appears in the text; a call's name counts as
    traced when it is part of its id (Kimi: `functions.get_weather:0`)."""
    out = [("reasoning", reasoning), ("answer", answer)]
    for n, c in enumerate(tool_calls or ()):
        out.append((f"tool_calls[{n}].id", c["id"]))
        if not (c["id"] and c["name"] and c["name"] in c["id"]):
            out.append((f"tool_calls[{n}].name", c["name"]))
        out.append((f"tool_calls[{n}].arguments", c["arguments"]))
    return [(name, p) for name, p in out if p]


def _find(texts: list[str], i: int, at: int, piece: str) -> tuple[int, int]:
    """(segment, offset) of the piece's first whole occurrence from the cursor, else (-1, -1)."""
    for k in range(i, len(texts)):
        j = texts[k].find(piece, at if k == i else 0)
        if j >= 0:
            return k, j
    return -1, -1


def _skipped(texts: list[str], i: int, at: int, k: int, j: int) -> str:
    """The non-whitespace text between the cursor and (k, j); all of it when k < 0."""
    if k < 0:
        k, j = len(texts) - 1, len(texts[-1])
    if k == i:
        return texts[i][at:j].strip()
    parts = [texts[i][at:], *texts[i + 1:k], texts[k][:j]]
    return next((p.strip() for p in parts if p.strip()), "")


def _dropped(text: str) -> str:
    quote = text if len(text) <= 80 else text[:80] + "…"
    return f"the parser dropped text from the completion: {quote!r}"


def _deleted_marker(texts: list[str], marks: list[str], i: int, at: int, piece: str,
                    name: str) -> str | None:
    """Why a piece is not in the text as it is: a marker the parser deleted from inside
    it (the piece is found once markers are removed, so it spans one), or None when the
    parser rewrote it."""
    j = "".join(texts[i:]).find(piece, at)
    if j < 0:
        return None
    first = bisect_right(list(accumulate(len(t) for t in texts[i:])), j)
    return (f"the parser deleted marker {marks[i + first]!r} from inside {name}: "
            "the output is not well formed")


def _crowded(gaps: list[list[str]], first_call: int | None, calls: int) -> str | None:
    """A marker more often than the structure has room for: once before the tool calls
    (think tags), once per call from the first call on, never twice in one gap."""
    for g in gaps:
        if len(set(g)) < len(g):
            twice = next(m for m in g if g.count(m) > 1)
            return (f"marker {twice!r} appears twice between two parts of the output: "
                    "the output is not well formed")
    split = len(gaps) if first_call is None else first_call
    head = [m for g in gaps[:split] for m in g]
    tail = [m for g in gaps[split:] for m in g]
    for m in head:
        if head.count(m) + tail.count(m) > 1:
            return f"marker {m!r} appears {head.count(m) + tail.count(m)} times, more than once"
    for m in tail:
        if tail.count(m) > calls:
            return f"marker {m!r} appears {tail.count(m)} times for {calls} tool call(s)"
    return None


def arguments_problem(tool_calls: list[dict[str, str | None]] | None) -> str | None:
    """Tool-call arguments must be one JSON object, as OpenAI's API defines them. A parse
    whose error is this, and nothing else, is a well-formed turn with a malformed call: a
    rollout answers it (rows/conversation.py)."""
    for n, c in enumerate(tool_calls or ()):
        try:
            args = json.loads(c["arguments"] or "")
        except json.JSONDecodeError as e:
            return f"tool_calls[{n}].arguments is not JSON: {e.msg} at char {e.pos}"
        if not isinstance(args, dict):
            return f"tool_calls[{n}].arguments is not a JSON object"
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
