"""A rollout history that outgrows its budget (`rollout.context: hide_tool_results`):
earlier tool messages' contents become a placeholder, oldest first, until the prompt fits.

Only contents change: every message, its role, tool call id and name stay, so the
template renders a valid conversation and the model reads that a result was there. The
prompt is rendered again from the previous render (tasks/rows/history.py: tokenized from
where the texts part, the turn counted as rerendered), with the ids a full render of the
changed messages gives. How many results to hide is guessed from the tokens per
character of the prompt at hand, then checked by that render; a guess short of the
budget hides more and renders again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from thinkbatch.schemas.rollout import BUDGET_SHARE, HIDDEN, ContextSpec
from thinkbatch.tasks.rows.history import PromptHistory

# The prompt of the conversation's messages as they are now, from a previous prompt.
Rerender = Callable[[PromptHistory], PromptHistory | None]


def budget(spec: ContextSpec, window: int | None, min_room: int) -> int | None:
    """The most tokens a prompt may hold before results are hidden: the job's budget (else
    a share of the window), never past the window less the turn's floor. None: no window
    known and no budget set."""
    if window is None:
        return spec.budget_tokens
    room = window - min_room
    return min(spec.budget_tokens or int(window * BUDGET_SHARE), room)


def hidable(messages: list[dict[str, Any]], keep_last: int) -> list[int]:
    """Indices of the tool messages that may still be hidden, oldest first: all but the
    last `keep_last` tool messages, less those hidden already."""
    tools = [i for i, m in enumerate(messages) if m.get("role") == "tool"]
    kept = tools[:len(tools) - keep_last] if keep_last else tools
    return [i for i in kept if messages[i].get("content") != HIDDEN]


def fit(prompt: PromptHistory, messages: list[dict[str, Any]], rerender: Rerender,
        limit: int, keep_last: int) -> tuple[PromptHistory | None, int]:
    """Hide results in `messages` (in place) until `rerender` gives a prompt of at most
    `limit` tokens, or nothing is left to hide; the last prompt and how many were hidden.
    A prompt still too long goes on to the engine, which ends the conversation as under
    `stop`."""
    hidden = 0
    current: PromptHistory | None = prompt
    while current is not None and len(current) > limit:
        todo = hidable(messages, keep_last)
        if not todo:
            break
        per_char = len(current) / max(current.chars, 1)
        excess, saved = len(current) - limit, 0.0
        for i in todo:
            saved += (len(_text(messages[i].get("content"))) - len(HIDDEN)) * per_char
            messages[i] = {**messages[i], "content": HIDDEN}
            hidden += 1
            if saved >= excess:
                break
        current = rerender(current)
    return current, hidden


def _text(content: Any) -> str:
    """A message content's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
