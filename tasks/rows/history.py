"""A rollout's prompt, turn after turn, with host work in proportion to the new messages.

Each turn's prompt is vLLM's chat rendering of the whole history (`LLM.chat`'s ids, data
that spells control tokens tokenized as text: prompt_tokens.py). Rendering the template
and tokenizing it all again cost time with the history (0.8 s at 185k tokens to tokenize,
~25 ms to render as text at 160k), turns x history over a conversation.

A turn that only appends messages (a rollout's: the model's turn, then its tool results)
renders the new messages alone, as a delta: the conversation's head (the messages before
its first assistant turn: the system prompt and the task), the previous turn's own
messages (the window) and the new ones, each rendering a short conversation. The delta is
what the new messages add after the window; the previous prompt's text up to its
generation prompt, then the delta, is the new prompt's text. It is trusted only where
checks say the template is append-only: once per template (tools, chat kwargs and head's
roles), a probe renders a synthetic rollout of `PROBE_TURNS` turns both ways and requires
every delta to equal the full render's; and at every turn the window must render in the
short conversation as it did in the whole one (the text kept from the previous prompt),
the head too, and the new messages must not change the window's text (a template that
rewrites earlier turns, as Kimi's drops reasoning before a later answer). Any check that
fails, a history changed in place (tool results hidden, tasks/rows/context.py), or a
template with no generation-prompt-free text, renders the whole history as before.

Only the text from the last control token of the template before the new messages is
tokenized. Tokenizers split at such a token before anything else (an added token,
tiktoken's special table), so the ids before it do not depend on the text after it, and
the tokenization from it on is the tokenizer's own (a token that eats the space after it
still does). A whole render (the first turn, a rewrite) tokenizes from where its text and
the previous prompt's (rendered again from the messages it held, checked by a checksum)
part, to where they meet again (the first control token inside the suffix they share,
whose ids and those after it are the previous prompt's: earlier tool results hidden cost
the stretch hidden): still the ids a full render gives, and the turn is counted
(`rerendered`) where it did not extend the previous prompt. Where no control token can be
trusted as a cut, the whole text is tokenized.

Kept per conversation: its ids as 2-byte integers where the vocabulary allows (under
65,536 ids), else 4-byte, where the template's control tokens
lie, the text of its head and of its last stretch (from the last control token before its
generation prompt), and references to the messages it rendered; not the text.
"""

from __future__ import annotations

import json
import zlib
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Protocol

from thinkbatch.tasks.rows.prompt_tokens import (ControlTokens, Masked, Messages, Tools,
                                                 new_nonce, tiktoken_specials)

PROBE_TURNS = 24  # a template's probe: the synthetic rollout's length


class RenderText(Protocol):
    """The template's text for a conversation, as vLLM renders it before tokenizing, with
    the generation prompt or without (None: a prompt that is not text alone, multimodal
    or tokenized by the template itself)."""

    def __call__(self, messages: Messages, tools: Tools, kwargs: dict[str, Any],
                 generation: bool = True) -> str | None: ...


@dataclass(slots=True)
class PromptHistory:
    """One turn's prompt of one conversation, and what the next turn reuses of it."""

    ids: array  # its token ids (`id_type`)
    starts: array  # the template's control tokens that cut the tokenization: their
    ends: array  # character spans in the text
    at: array  # and each one's place in `ids`
    chars: int  # the length of its text (its data masked when `nonce` is set)
    body: int  # where its generation prompt starts in the text; -1: not known
    head: int  # its head: the messages before the first assistant turn
    head_text: str  # the head's text, without a generation prompt
    tail_at: int  # where `tail` starts in the text: a cut inside the body, else 0
    tail: str  # the text from there to its end
    crc: int  # the body's CRC-32 (UTF-8), to check a render of it again
    rendered: tuple[dict[str, Any], ...]  # the messages it rendered (references)
    nonce: str | None  # the conversation's mask (prompt_tokens.py), once data spelt markers
    rerendered: bool = False  # tokenized from before the previous prompt's end
    tokenized: int = 0  # characters of the text tokenized for this turn
    delta: bool = False  # rendered from the new messages alone
    # The ids as the engine takes them (a list), made off the driver and let go once the
    # engine has the request: the one id list a conversation holds, and only meanwhile.
    ready: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def messages(self) -> int:
        """How many messages it rendered."""
        return len(self.rendered)


def splitting_ids(tokenizer: Any) -> frozenset[int]:
    """The ids a tokenizer splits text at before tokenizing: its added tokens and tiktoken's
    special table. A marker only the vocabulary holds (found by the parsers' name) may
    merge with the text beside it, so it is no cut."""
    return frozenset(tokenizer.get_added_vocab().values()) | frozenset(
        tiktoken_specials(tokenizer).values())


def id_type(tokenizer: Any) -> str:
    """The narrowest array type that holds every id the tokenizer gives: its vocabulary,
    added tokens and tiktoken's special table ("H": 2 bytes, "i": 4)."""
    top = max([*tokenizer.get_vocab().values(), *tokenizer.get_added_vocab().values(),
               *tiktoken_specials(tokenizer).values()], default=0)
    return "H" if top < 1 << 16 else "i"


class Histories:
    """One tokenizer's incremental prompts: `control` as the engine guards them, the
    template's text from `render_text`."""

    def __init__(self, render_text: RenderText, control: ControlTokens):
        self.render_text = render_text
        self.control = control
        self._splitting = splitting_ids(control.tokenizer)
        self._control_ids = frozenset(control.ids.values())
        self._id_type = id_type(control.tokenizer)
        self._append_only: dict[str, bool] = {}  # the probe's verdict, per template use

    def next(self, prev: PromptHistory | None, messages: Messages, tools: Tools,
             kwargs: dict[str, Any], *, allow_special_tokens: bool) -> PromptHistory | None:
        """The prompt of `messages` (the previous turn's and those appended since), with
        the ids a full render gives; None where the template gives no text."""
        if prev is not None and len(messages) < prev.messages:
            prev = None
        nonce = self._nonce(prev, messages, tools, kwargs, allow_special_tokens)
        if prev is not None:
            history = self._delta(prev, messages, tools, kwargs, nonce, allow_special_tokens)
            if history is not None:
                return history
        return self._whole(prev, messages, tools, kwargs, nonce, allow_special_tokens)

    # -- the new messages alone -------------------------------------------------------

    def _delta(self, prev: PromptHistory, messages: Messages, tools: Tools,
               kwargs: dict[str, Any], nonce: str | None,
               allow: bool) -> PromptHistory | None:
        """The prompt from the new messages' text (the module's docstring); None where a
        check fails and the whole history must be rendered."""
        m = prev.messages
        if (prev.body < 0 or len(messages) <= m or tuple(messages[:m]) != prev.rendered
                or not self._trusted(messages[:prev.head], tools, kwargs)):
            return None
        w = _window(messages, prev.head, m)
        texts = self._delta_texts(messages[:prev.head], messages[w:m], messages[m:], tools,
                                  kwargs, nonce, allow)
        if texts is None:
            return None
        a, d, d_body, masked = texts
        off, keep = prev.tail_at, prev.body - prev.tail_at
        # The head renders as before, and the window as the whole history rendered it (as
        # far as both the window's text and the text kept from the previous prompt go).
        k = min(keep, len(a) - len(prev.head_text))
        if not (a.startswith(prev.head_text) and (k <= 0 or a.endswith(prev.tail[keep - k:keep]))):
            return None
        local = prev.tail[:keep] + d  # the new text from `off` on
        generation = prev.tail[keep:]
        shared = prev.body + _shared(generation, d)
        pattern = self.control.pattern
        i = bisect_right(prev.ends, shared) - 1
        while pattern is not None and i >= 0 and prev.starts[i] >= off:
            found = pattern.match(local, prev.starts[i] - off)
            if found is not None and found.end() == prev.ends[i] - off:
                break
            i -= 1
        else:
            return None
        start = prev.starts[i] - off
        tokens = self._tokens(local, start, masked)
        if tokens is None or not tokens[0] or tokens[0][0] != prev.ids[prev.at[i]]:
            return None
        ids = prev.ids[:prev.at[i]]
        ids.extend(tokens[0])
        spans = (prev.starts[:i], prev.ends[:i], prev.at[:i])
        for mine, theirs, shift in zip(spans, tokens[1:], (off, off, prev.at[i])):
            mine.extend(v + shift for v in theirs)
        body = prev.body + d_body
        return self._history(ids, spans, local, off, prev.body + len(d), body, prev.body,
                             prev.head, prev.head_text,
                             zlib.crc32(d[:d_body].encode(), prev.crc), messages, nonce,
                             rerendered=not d.startswith(generation),
                             tokenized=len(local) - start, delta=True)

    def _delta_texts(self, head: Messages, window: Messages, new: Messages, tools: Tools,
                     kwargs: dict[str, Any], nonce: str | None,
                     allow: bool) -> tuple[str, str, int, Masked | None] | None:
        """The text of `head + window` (no generation prompt), and what `new` adds after
        it (with the generation prompt) with the length of its part before that prompt;
        None where the new messages change the window's text or the template gives none."""
        seq, masked = [*head, *window, *new], None
        if nonce is not None:
            masked = self.control.mask(seq, tools, kwargs, nonce=nonce,
                                       tool_results_only=allow)
            seq, tools, kwargs = masked.messages, masked.tools, masked.kwargs
        render = self.render_text
        a = render(seq[:len(head) + len(window)], tools, kwargs, False)
        c = render(seq, tools, kwargs, False)
        b = render(seq, tools, kwargs, True)
        if a is None or b is None or c is None or not (c.startswith(a) and b.startswith(c)):
            return None
        return a, b[len(a):], len(c) - len(a), masked

    def _trusted(self, head: Messages, tools: Tools, kwargs: dict[str, Any]) -> bool:
        """Whether the template is append-only for a rollout, by the probe's verdict (once
        per tools, chat kwargs and head's roles)."""
        key = json.dumps([tools, kwargs, [m.get("role") for m in head]], sort_keys=True,
                         default=str)
        verdict = self._append_only.get(key)
        if verdict is None:
            try:
                verdict = self._probe(head, tools, kwargs)
            except Exception:  # a template that cannot render the probe: never trusted
                verdict = False
            self._append_only[key] = verdict
        return verdict

    def _probe(self, head: Messages, tools: Tools, kwargs: dict[str, Any]) -> bool:
        """A synthetic rollout after `head` (turns of reasoning, a tool call and its result,
        an answer text on every other turn) renders, at each of its `PROBE_TURNS` turns,
        as the delta says: the whole render is the previous one's text before its
        generation prompt, then the delta."""
        name = "probe"
        if tools and isinstance(tools[0].get("function"), dict):
            name = tools[0]["function"].get("name") or name
        render = self.render_text
        messages = list(head)
        body = render(messages, tools, kwargs, False)
        for i in range(PROBE_TURNS):
            if body is None:
                return False
            call = f"functions.{name}:{i}"
            new = [{"role": "assistant", "content": f"Step {i}." if i % 2 else "",
                    "reasoning_content": f"Probe step {i}.",
                    "tool_calls": [{"id": call, "type": "function", "function": {
                        "name": name, "arguments": json.dumps({"step": i})}}]},
                   {"role": "tool", "tool_call_id": call, "name": name,
                    "content": f"result {i}"}]
            texts = self._delta_texts(head, messages[_window(messages, len(head),
                                                               len(messages)):],
                                      new, tools, kwargs, None, False)
            messages += new
            full, full_body = render(messages, tools, kwargs, True), render(
                messages, tools, kwargs, False)
            if (texts is None or full_body is None or full != body + texts[1]
                    or full_body != body + texts[1][:texts[2]]):
                return False
            body = full_body
        return True

    # -- the whole history ------------------------------------------------------------

    def _whole(self, prev: PromptHistory | None, messages: Messages, tools: Tools,
               kwargs: dict[str, Any], nonce: str | None,
               allow: bool) -> PromptHistory | None:
        """The prompt from the whole history's text, tokenized from where it parts from
        the previous prompt's (rendered again) to where they meet again."""
        text, masked = self._render(messages, tools, kwargs, nonce, allow, True)
        if text is None:
            return None
        old = self._again(prev, tools, kwargs, allow) if prev is not None else None
        cut, extends = self._cut(prev, old, text) if old is not None else (None, False)
        if cut is not None:
            assert prev is not None and old is not None
            start = prev.starts[cut]
            tail = None if extends else self._tail(prev, old, text, cut)
            moved = len(text) - len(old)
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
                return self._ahead(text, ids, spans, messages, tools, kwargs, nonce, allow,
                                   rerendered=not extends, tokenized=end - start)
        tokens = self._tokens(text, 0, masked)
        if tokens is None:
            raise ValueError("the chat template altered data that spells control tokens; "
                             "set input.allow_special_tokens: true to pass them through")
        return self._ahead(text, array(self._id_type, tokens[0]), tokens[1:], messages, tools,
                           kwargs, nonce, allow, rerendered=prev is not None,
                           tokenized=len(text))

    def _render(self, messages: Messages, tools: Tools, kwargs: dict[str, Any],
                nonce: str | None, allow: bool,
                generation: bool) -> tuple[str | None, Masked | None]:
        if nonce is None:
            return self.render_text(messages, tools, kwargs, generation), None
        masked = self.control.mask(messages, tools, kwargs, nonce=nonce,
                                   tool_results_only=allow)
        return self.render_text(masked.messages, masked.tools, masked.kwargs,
                                generation), masked

    def _again(self, prev: PromptHistory, tools: Tools, kwargs: dict[str, Any],
               allow: bool) -> str | None:
        """The previous prompt's text, rendered again from the messages it held; None
        where it is not the text its ids came from (a template that reads the clock)."""
        text, _ = self._render(list(prev.rendered), tools, kwargs, prev.nonce, allow, True)
        body = prev.body if prev.body >= 0 else prev.chars
        if (text is None or len(text) != prev.chars or text[prev.tail_at:] != prev.tail
                or zlib.crc32(text[:body].encode()) != prev.crc):
            return None
        return text

    def _ahead(self, text: str, ids: array, spans: tuple[array, array, array],
               messages: Messages, tools: Tools, kwargs: dict[str, Any], nonce: str | None,
               allow: bool, *, rerendered: bool, tokenized: int) -> PromptHistory:
        """A whole render's prompt, with what its next turn's delta reads: where its
        generation prompt starts, its head's text, and the text of its last turn."""
        head = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                    len(messages))
        body_text, _ = self._render(messages, tools, kwargs, nonce, allow, False)
        head_text, _ = self._render(messages[:head], tools, kwargs, nonce, allow, False)
        window, _ = self._render([*messages[:head], *messages[_window(messages, head,
                                                                       len(messages)):]],
                                 tools, kwargs, nonce, allow, False)
        if (body_text is None or head_text is None or window is None
                or not text.startswith(body_text) or not text.startswith(head_text)
                or not window.startswith(head_text)):
            return PromptHistory(ids, *spans, len(text), -1, head, "", len(text), "",
                                 zlib.crc32(text.encode()), tuple(messages), nonce,
                                 rerendered=rerendered, tokenized=tokenized)
        body = len(body_text)
        return self._history(ids, spans, text, 0, len(text), body,
                             max(body - len(window) + len(head_text), 0), head, head_text,
                             zlib.crc32(body_text.encode()), messages, nonce,
                             rerendered=rerendered, tokenized=tokenized)

    @staticmethod
    def _history(ids: array, spans: tuple[array, array, array], text: str, offset: int,
                 chars: int, body: int, window: int, head: int, head_text: str, crc: int,
                 messages: Messages, nonce: str | None, *, rerendered: bool, tokenized: int,
                 delta: bool = False) -> PromptHistory:
        """The prompt of `text` (the prompt's text from `offset` on), keeping its text from
        where its last turn's window starts, or its last cut inside the body if earlier."""
        starts, ends, _ = spans
        j = bisect_right(ends, body) - 1
        tail_at = max(min(window, starts[j] if j >= 0 else 0), offset)
        return PromptHistory(ids, *spans, chars, body, head, head_text, tail_at,
                             text[tail_at - offset:], crc, tuple(messages), nonce,
                             rerendered=rerendered, tokenized=tokenized, delta=delta)

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

    def _cut(self, prev: PromptHistory, old: str, text: str) -> tuple[int | None, bool]:
        """The last of the previous prompt's cuts inside the prefix `text` shares with it,
        where `text` still has that same control token (not a longer one starting there);
        and whether `text` extends the previous prompt."""
        extends = text.startswith(old)
        shared = len(old) if extends else _shared(old, text)
        pattern = self.control.pattern
        i = bisect_right(prev.ends, shared) - 1
        while i >= 0 and pattern is not None:
            m = pattern.match(text, prev.starts[i])
            if m is not None and m.end() == prev.ends[i]:
                return i, extends
            i -= 1
        return None, extends

    def _tail(self, prev: PromptHistory, old: str, text: str, cut: int) -> int | None:
        """The first of the previous prompt's cuts after `cut` that lies in the suffix
        `text` shares with it (a history whose earlier contents changed, context.py): the
        ids from there on are the previous prompt's, as the tokenizer splits there."""
        shared = _shared_suffix(old, text)
        i = bisect_right(prev.starts, len(old) - shared - 1)
        i = max(i, cut + 1)
        if i >= len(prev.starts) or (
                prev.starts[i] + len(text) - len(old) < prev.starts[cut]):
            return None
        return i

    def _tokens(self, text: str, start: int, masked: Masked | None,
                end: int | None = None) -> tuple[list[int], array, array, array] | None:
        """Ids of `text[start:end]` and its cuts (spans relative to `text`, places
        relative to the ids), tokenized as a full render tokenizes that stretch: the whole
        text by the tokenizer, or (masked) piece by piece between the template's control
        tokens, placeholders restored. None: the template altered a placeholder."""
        control = self.control
        starts, ends, at = array("i"), array("i"), array("i")
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


def _window(messages: Messages, head: int, end: int) -> int:
    """Where the last turn of `messages[:end]` starts: its last assistant message at or
    after the head (the head's end when none)."""
    return next((i for i in range(end - 1, head - 1, -1)
                 if messages[i].get("role") == "assistant"), head)


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
