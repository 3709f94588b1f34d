"""Data is tokenized as text: only the chat template's own markers become control tokens.

vLLM renders the chat template to text and tokenizes the whole string, so a prompt that
spells `<|im_end|>` gets the real end-of-turn id, and data could forge turns, thinking or
tool calls. A row whose data (message fields, tool schemas, template kwargs) holds no
control-token text takes vLLM's path unchanged. A row that does is rendered with each such
occurrence replaced by a unique placeholder, so every control token left in the rendered
text is the template's own; the text between them is tokenized with special tokens split,
the placeholders put back as the text they stood for. A template that branches on a marker
in the data (Qwen3 splitting `</think>` out of assistant content) sees plain text instead.

Which strings are control tokens is not the tokenizer's word alone: Kimi-K2-Thinking's
tokenizer keeps `<think>` and its tool-call markers in tiktoken's special table and tells
transformers only of a few others, and it ignores `split_special_tokens`. So the parsers'
own marker names count too, looked up in the vocabulary, and text is known to be text by
its token ids, not by what the tokenizer was asked to do.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None
# vLLM's prompt for one conversation, as `LLM._preprocess_chat_one` returns it.
Render = Callable[[Messages, Tools, dict[str, Any]], dict[str, Any]]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def one_token(tokenizer: Any, vocab: dict[str, int], marker: str) -> int | None:
    """The id of `marker` if the tokenizer has it as one token: found by name in the
    vocabulary (as vLLM's parsers find their markers) and encoded as that one id."""
    i = vocab.get(marker)
    if i is None or list(tokenizer.encode(marker, add_special_tokens=False)) != [i]:
        return None
    return i


def tiktoken_specials(tokenizer: Any) -> dict[str, int]:
    """The special-token table of a slow tokenizer over tiktoken (Kimi-K2's, Qwen-1's):
    every entry is a control token the tokenizer encodes from its spelling, whether or not
    transformers was told of it (Kimi's tells it of eight)."""
    try:
        import tiktoken
    except ImportError:
        return {}
    for value in vars(tokenizer).values():
        if isinstance(value, tiktoken.Encoding):
            return {t: value.encode_single_token(t) for t in value.special_tokens_set}
    return {}


def control_tokens(tokenizer: Any, markers: Iterable[str] = ()) -> dict[str, int]:
    """The tokenizer's special added tokens (and tiktoken special tokens), non-special
    added tokens the chat template writes itself (Qwen3 and DeepSeek-R1 keep `<think>`
    non-special), and the `markers` (the parsers' names) the vocabulary holds as one token.
    Other added tokens (whole words, runs of spaces) are vocabulary, not structure."""
    added: dict[str, int] = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", False)}
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = "".join(template.values())
    found = {t: i for t, i in added.items() if t in special or (t.strip() and t in template)}
    found |= tiktoken_specials(tokenizer)
    vocab = tokenizer.get_vocab()
    for m in markers:
        if m not in found and (i := one_token(tokenizer, vocab, m)) is not None:
            found[m] = i
    return found


def _cut(marker: str) -> int:
    """Where a marker splits as text in every byte-level pre-tokenizer in use (GPT-2's,
    cl100k's, Kimi's): after its first letter or digit that punctuation or a space follows
    (`<think` `>`, `<|im` `_end|>`). Cut there, the text around the marker tokenizes as it
    would with split_special_tokens honoured; with no such place, after its first character."""
    for i in range(1, len(marker)):
        if marker[i - 1].isalnum() and not marker[i].isalnum() and marker[i] != "'":
            return i
    return 1


def new_nonce() -> str:
    """A placeholder prefix: letters and digits only, so the template's JSON filters leave
    it as it is; random, so the data cannot spell it."""
    return "tbctl" + secrets.token_hex(8)


def _is_tool_result(message: dict[str, Any]) -> bool:
    return message.get("role") == "tool"


@dataclass(slots=True)
class Masked:
    """A row's data with each control-token occurrence replaced by a placeholder."""

    messages: Messages
    tools: Tools
    kwargs: dict[str, Any]
    nonce: str
    markers: list[str]  # the occurrences masked, in order
    table: list[str]  # placeholder i stands for table[i] (ControlTokens.markers)

    def restore(self, text: str) -> str:
        return re.sub(re.escape(self.nonce) + r"x(\d+)x",
                      lambda m: self.table[int(m.group(1))], text)


class ControlTokens:
    """One tokenizer's control tokens (with the parsers' `markers`), compiled once into one
    alternation."""

    def __init__(self, tokenizer: Any, markers: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.ids = control_tokens(tokenizer, markers)
        self._id_set = frozenset(self.ids.values())
        # Longest first: at one position the longest marker wins, as in the tokenizer.
        self.markers = sorted(self.ids, key=len, reverse=True)
        self._index = {m: i for i, m in enumerate(self.markers)}
        self.pattern = (re.compile("|".join(map(re.escape, self.markers))) if self.markers
                        else None)

    def found_in(self, messages: Messages, tools: Tools, kwargs: dict[str, Any]) -> bool:
        pattern = self.pattern
        return pattern is not None and any(
            pattern.search(s) for s in _strings((messages, tools, kwargs)))

    def mask(self, messages: Messages, tools: Tools, kwargs: dict[str, Any], *,
             tool_results_only: bool = False, nonce: str | None = None) -> Masked:
        """Each placeholder names its marker by its place in `self.markers`, so the same
        data masked with the same `nonce` (a conversation's, turn after turn) renders to
        the same text."""
        nonce = nonce or new_nonce()
        markers: list[str] = []
        index = self._index

        def sub(match: re.Match[str]) -> str:
            markers.append(match.group())
            return f"{nonce}x{index[match.group()]}x"

        def fn(s: str) -> str:
            return self.pattern.sub(sub, s)  # type: ignore[union-attr]

        if tool_results_only:
            return Masked([_map_strings(m, fn) if _is_tool_result(m) else m for m in messages],
                          tools, kwargs, nonce, markers, self.markers)
        return Masked(_map_strings(messages, fn), _map_strings(tools, fn),
                      _map_strings(kwargs, fn), nonce, markers, self.markers)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` with every control-token spelling as plain text, checked by
        the ids."""
        if not text:
            return []
        ids = self._plain(text)
        if not self._id_set.intersection(ids):
            return ids
        # The tokenizer kept a marker whole (a non-special added token, or a tokenizer that
        # ignores split_special_tokens, as Kimi's does): cut each marker in two and tokenize
        # the pieces between the cuts.
        pieces, pos = [], 0
        for m in self.pattern.finditer(text):  # type: ignore[union-attr]
            cut = m.start() + _cut(m.group())
            pieces.append(text[pos:cut])
            pos = cut
        pieces.append(text[pos:])
        ids = [i for piece in pieces for i in self._plain(piece)]
        if self._id_set.intersection(ids):
            raise ValueError("the tokenizer turns data text into control tokens even when "
                             "split; set input.allow_special_tokens: true to pass them through")
        return ids

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=True)["input_ids"])

    def tokenize(self, rendered: str, masked: Masked) -> tuple[list[int], str]:
        """Ids and text of a template rendered from masked data: the markers in `rendered`
        are the template's; the text between them is tokenized as text, placeholders
        restored. Splitting at markers is what the tokenizer does itself, so text with no
        placeholder tokenizes as in vLLM's own path."""
        ids: list[int] = []
        parts: list[str] = []
        pos = 0
        for m in self.pattern.finditer(rendered):  # type: ignore[union-attr]
            piece = masked.restore(rendered[pos:m.start()])
            ids += self.text_ids(piece)
            ids.append(self.ids[m.group()])
            parts += [piece, m.group()]
            pos = m.end()
        piece = masked.restore(rendered[pos:])
        ids += self.text_ids(piece)
        parts.append(piece)
        text = "".join(parts)
        if masked.nonce.lower() in text.lower():
            raise ValueError("the chat template altered data that spells control tokens; set "
                             "input.allow_special_tokens: true to pass them through")
        return ids, text


def chat_prompt(render: Render, control: ControlTokens, messages: Messages, tools: Tools,
                kwargs: dict[str, Any], *, allow_special_tokens: bool) -> dict[str, Any]:
    """vLLM's prompt for one row, with the data's control-token text tokenized as text
    unless the job allows special tokens. Rows without such text are vLLM's own. Tool
    results (web pages, MCP content) are text whatever the job allows: the flag trusts
    the job's own data, never what a tool returned."""
    if allow_special_tokens:
        results = [m for m in messages if _is_tool_result(m)]
        if not control.found_in(results, None, {}):
            return render(messages, tools, kwargs)
        masked = control.mask(messages, tools, kwargs, tool_results_only=True)
    elif not control.found_in(messages, tools, kwargs):
        return render(messages, tools, kwargs)
    else:
        masked = control.mask(messages, tools, kwargs)
    prompt = render(masked.messages, masked.tools, masked.kwargs)
    if prompt.get("type") != "token" or not isinstance(prompt.get("prompt"), str):
        raise ValueError("data spells control tokens and this model's renderer returns no "
                         "text to re-tokenize; set input.allow_special_tokens: true to pass "
                         "them through")
    ids, text = control.tokenize(prompt["prompt"], masked)
    return {**prompt, "prompt_token_ids": ids, "prompt": text}
