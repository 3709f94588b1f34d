"""A rollout's prompt, turn after turn, without tokenizing its history again.

Each turn's prompt is vLLM's chat rendering of the whole history (`LLM.chat`'s ids, data
that spells control tokens tokenized as text: prompt_tokens.py). Tokenizing it all again
costs time with the history (0.8 s at 185k tokens), turns x history over a conversation.
Rendering the template is string work, cheap beside tokenizing; so each turn renders the
whole text and tokenizes only from the last control token of the template inside the
prefix it shares with the previous turn's text. Tokenizers split at such a token before
anything else (an added token, tiktoken's special table), so the ids before it do not
depend on the text after it, and the tokenization from it on is the tokenizer's own
(a token that eats the space after it still does).

A template that extends the previous prompt (Kimi's, in a rollout: the turn, its tool
results, the generation prompt) costs the new messages. One that writes earlier history
otherwise (reasoning dropped before a later answer, a generation prompt that the next
turn renders differently) costs from where the two texts part to where they meet again
(the first control token inside the suffix they share, whose ids and those after it are
the previous prompt's: earlier tool results hidden, tasks/rows/context.py, cost the
stretch hidden): still the ids a full render gives, and the turn is counted
(`rerendered`). Where no control token can be trusted as a cut, the whole text is
tokenized.

Kept per conversation: the rendered text (its data masked, when masked), its ids as
4-byte integers and where the template's control tokens lie; no id list.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinkbatch.tasks.rows.prompt_tokens import (ControlTokens, Masked, Messages, Tools,
                                                 new_nonce, tiktoken_specials)

# The template's text for a conversation, as vLLM renders it before tokenizing (None: a
# prompt that is not text alone, multimodal or tokenized by the template itself).
RenderText = Callable[[Messages, Tools, dict[str, Any]], str | None]


@dataclass(slots=True)
class PromptHistory:
    """One turn's prompt of one conversation, and what the next turn reuses of it."""

    text: str  # the rendered text, its data masked when `nonce` is set
    ids: array  # its token ids
    starts: array  # the template's control tokens that cut the tokenization: their
    ends: array  # character spans in `text`
    at: array  # and each one's place in `ids`
    messages: int  # how many messages it rendered
    nonce: str | None  # the conversation's mask (prompt_tokens.py), once data spelt markers
    rerendered: bool = False  # tokenized from before the previous prompt's end
    tokenized: int = 0  # characters of `text` tokenized for this turn
    # The ids as the engine takes them (a list), made off the driver and let go once the
    # engine has the request: the one id list a conversation holds, and only meanwhile.
    ready: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def splitting_ids(tokenizer: Any) -> frozenset[int]:
    """The ids a tokenizer splits text at before tokenizing: its added tokens and tiktoken's
    special table. A marker only the vocabulary holds (found by the parsers' name) may
    merge with the text beside it, so it is no cut."""
    return frozenset(tokenizer.get_added_vocab().values()) | frozenset(
        tiktoken_specials(tokenizer).values())


class Histories:
    """One tokenizer's incremental prompts: `control` as the engine guards them, the
    template's text from `render_text`."""

    def __init__(self, render_text: RenderText, control: ControlTokens):
        self.render_text = render_text
        self.control = control
        self._splitting = splitting_ids(control.tokenizer)
        self._control_ids = frozenset(control.ids.values())

    def next(self, prev: PromptHistory | None, messages: Messages, tools: Tools,
             kwargs: dict[str, Any], *, allow_special_tokens: bool) -> PromptHistory | None:
        """The prompt of `messages` (the previous turn's and those appended since), with
        the ids a full render gives; None where the template gives no text."""
        if prev is not None and len(messages) < prev.messages:
            prev = None
        nonce = self._nonce(prev, messages, tools, kwargs, allow_special_tokens)
        masked = None
        if nonce is None:
            text = self.render_text(messages, tools, kwargs)
        else:
            masked = self.control.mask(messages, tools, kwargs, nonce=nonce,
                                       tool_results_only=allow_special_tokens)
            text = self.render_text(masked.messages, masked.tools, masked.kwargs)
        if text is None:
            return None
        cut, extends = self._cut(prev, text) if prev is not None else (None, False)
        if cut is not None:
            assert prev is not None
            start = prev.starts[cut]
            tail = None if extends else self._tail(prev, text, cut)
            moved = len(text) - len(prev.text)
            end = len(text) if tail is None else prev.ends[tail] + moved
            tokens = self._tokens(text, start, masked, end)
            if tokens is not None and tail is not None and not (
                    tokens[1] and tokens[1][-1] == prev.starts[tail] + moved
                    and tokens[3][-1] == len(tokens[0]) - 1):
                tail, end = None, len(text)  # the suffix's marker is not a cut here
                tokens = self._tokens(text, start, masked, end)
            if tokens is not None and tokens[0] and tokens[0][0] == prev.ids[prev.at[cut]]:
                ids = prev.ids[:prev.at[cut]]
                ids.extend(tokens[0])
                spans = (prev.starts[:cut], prev.ends[:cut], prev.at[:cut])
                for mine, theirs, shift in zip(spans, tokens[1:], (0, 0, prev.at[cut])):
                    mine.extend(v + shift for v in theirs)
                if tail is not None:  # the shared suffix's ids, as the previous prompt's
                    ids.extend(prev.ids[prev.at[tail] + 1:])
                    shifts = (moved, moved, len(ids) - len(prev.ids))
                    for mine, theirs, shift in zip(spans, (prev.starts, prev.ends, prev.at),
                                                   shifts):
                        mine.extend(v + shift for v in theirs[tail + 1:])
                return PromptHistory(text, ids, *spans, len(messages), nonce,
                                     rerendered=not extends, tokenized=end - start)
        tokens = self._tokens(text, 0, masked)
        if tokens is None:
            raise ValueError("the chat template altered data that spells control tokens; "
                             "set input.allow_special_tokens: true to pass them through")
        return PromptHistory(text, array("i", tokens[0]), *tokens[1:], len(messages), nonce,
                             rerendered=prev is not None, tokenized=len(text))

    def _nonce(self, prev: PromptHistory | None, messages: Messages, tools: Tools,
               kwargs: dict[str, Any], allow_special_tokens: bool) -> str | None:
        """The conversation's mask, made when its data first spells a control token (only
        the new messages are looked at: the rest were before). With special tokens
        allowed only tool results are masked (they are data whatever the job trusts)."""
        if prev is not None and prev.nonce is not None:
            return prev.nonce
        new = messages[prev.messages:] if prev is not None else messages
        if allow_special_tokens:
            found = self.control.found_in([m for m in new if m.get("role") == "tool"],
                                          None, {})
        elif prev is not None:
            found = self.control.found_in(new, None, {})
        else:
            found = self.control.found_in(messages, tools, kwargs)
        return new_nonce() if found else None

    def _cut(self, prev: PromptHistory, text: str) -> tuple[int | None, bool]:
        """The last of the previous prompt's cuts inside the prefix `text` shares with it,
        where `text` still has that same control token (not a longer one starting there);
        and whether `text` extends the previous prompt."""
        extends = text.startswith(prev.text)
        shared = len(prev.text) if extends else _shared(prev.text, text)
        pattern = self.control.pattern
        i = bisect_right(prev.ends, shared) - 1
        while i >= 0 and pattern is not None:
            m = pattern.match(text, prev.starts[i])
            if m is not None and m.end() == prev.ends[i]:
                return i, extends
            i -= 1
        return None, extends

    def _tail(self, prev: PromptHistory, text: str, cut: int) -> int | None:
        """The first of the previous prompt's cuts after `cut` that lies in the suffix
        `text` shares with it (a history whose earlier contents changed, context.py): the
        ids from there on are the previous prompt's, as the tokenizer splits there."""
        shared = _shared_suffix(prev.text, text)
        i = bisect_right(prev.starts, len(prev.text) - shared - 1)
        i = max(i, cut + 1)
        if i >= len(prev.starts) or (
                prev.starts[i] + len(text) - len(prev.text) < prev.starts[cut]):
            return None
        return i

    def _tokens(self, text: str, start: int, masked: Masked | None,
                end: int | None = None) -> tuple[list[int], array, array, array] | None:
        """Ids of `text[start:end]` and its cuts (spans relative to `text`, places
        relative to the ids), tokenized as a full render tokenizes that stretch: the whole
        text by the tokenizer, or (masked) piece by piece between the template's control
        tokens, placeholders restored. None: the template altered a placeholder."""
        control = self.control
        starts, ends, at = array("q"), array("q"), array("q")
        pattern = control.pattern
        end = len(text) if end is None else end
        if masked is None:
            ids = list(control.tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
            matches = list(pattern.finditer(text, start, end)) if pattern is not None else []
            where = [k for k, t in enumerate(ids) if t in self._control_ids]
            if [control.ids[m.group()] for m in matches] == [ids[k] for k in where]:
                for m, k in zip(matches, where):
                    if ids[k] in self._splitting:
                        starts.append(m.start())
                        ends.append(m.end())
                        at.append(k)
            return ids, starts, ends, at
        assert pattern is not None  # masked only where control tokens exist
        ids, pos = [], start
        for m in pattern.finditer(text, start, end):
            piece = masked.restore(text[pos:m.start()])
            if masked.nonce.lower() in piece.lower():
                return None
            ids += control.text_ids(piece)
            if control.ids[m.group()] in self._splitting:
                starts.append(m.start())
                ends.append(m.end())
                at.append(len(ids))
            ids.append(control.ids[m.group()])
            pos = m.end()
        piece = masked.restore(text[pos:end])
        if masked.nonce.lower() in piece.lower():
            return None
        ids += control.text_ids(piece)
        return ids, starts, ends, at


def _shared(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`, by halving (slices compare
    at C speed; a character loop would cost the history in Python)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shared_suffix(a: str, b: str) -> int:
    """The length of the longest common suffix of `a` and `b`, by halving (as _shared)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo
