"""Every row is a conversation: one sample of one row, carried through its turns. A
single-turn job's conversations end at their first turn (a turn with tool calls too);
an agentic rollout's go turn after turn with their tools in between, and no
conversation waits for another's (no barrier across turns).

The pipeline's driver thread owns every conversation's state. A rollout turn that ends
in tool calls hands them to the toolbox (tools/toolbox.py), which runs them on its own
pool; their results join the history and the next turn's prompt is rendered on a render
thread (tasks/rows/history.py: the new messages tokenized, not the history), off the
driver that steps the engine; the conversation is then put on a queue, and the driver
takes it from there and submits its next turn ahead of new rows, so conversations in
flight finish first. A history that outgrows its budget under `rollout.context:
hide_tool_results` has earlier tool results hidden there too (tasks/rows/context.py).
With `rollout.checkpoint_seconds` set, a conversation's state (its messages, turns and
malformed count) is made into bytes on the render thread once its tools returned, and the
committer saves it (store/open_conversations.py): a rerun resumes it from there, its next
turn rendered from the saved messages, without calling those tools again. At 0 (every
turn boundary) its next turn waits until that save is written (`defer`).
A conversation is one output row, written when it ends: an answer (`ok`), `max_turns`,
a turn that failed (its status; a rollout names the turn in `error`), or `tool_error`
when a call failed because its source is down for good (an MCP server no restart brought
back): the model would only read errors where the data meant results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import (Generation, Parsed, RowRequest, ToolResult, Trajectory,
                                       Turn)
from thinkbatch.tasks.rows import context
from thinkbatch.tasks.rows.history import PromptHistory
from thinkbatch.tasks.rows.parse import OutputParser, arguments_problem, schema_problem
from thinkbatch.tasks.tools.tool import ToolboxError
from thinkbatch.tasks.tools.toolbox import Toolbox

log = logging.getLogger("thinkbatch.conversation")

# A turn's prompt from the previous turn's (the engine's `render`), on the render thread.
Render = Callable[[RowRequest, PromptHistory | None], PromptHistory | None]


@dataclass(slots=True)
class Conversation:
    """One sample of one row carried through its turns: the unit of exactly-once, keyed
    (row_index, sample)."""

    shard_id: int
    req: RowRequest
    sample: int
    messages: list[dict[str, Any]] = field(default_factory=list)  # the history so far
    turns: list[Turn] = field(default_factory=list)
    started: float | None = None  # monotonic time its first turn was submitted
    started_at: float | None = None  # the same as Unix time, for its row's `started_at`
    malformed: int = 0  # consecutive turns whose tool calls had malformed arguments
    history: PromptHistory | None = None  # the next turn's prompt, rendered ahead
    hidden: int = 0  # tool results hidden for the next turn (rollout.context)
    state: bytes | None = None  # its state at its last turn boundary, not yet saved
    saving: bool = False  # its next turn waits for that state to be written (`defer`)

    @property
    def key(self) -> str:
        """The engine's request id of the turn being generated."""
        return f"{self.req.row_index}:{self.sample}:{len(self.turns)}"


def assistant_message(parsed: Parsed) -> dict[str, Any]:
    """A parsed turn as the OpenAI assistant message the next turn is rendered from."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.answer or "",
                               "reasoning_content": parsed.reasoning or ""}
    if parsed.tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in parsed.tool_calls]
    return message


def tool_message(result: ToolResult) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": result.call_id, "name": result.name,
            "content": result.content}


def _result_messages(messages: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The tool messages of a conversation's last `n` tool results, in order: each turn's
    results are appended as its tool messages (those before are the input's)."""
    tools = [m for m in messages if m.get("role") == "tool"]
    return tools[len(tools) - n:] if n else []


class Conversations:
    """The conversations of one pipeline between their turns. Without `job.rollout` each
    ends at its first turn and nothing here waits: no tools, no limit."""

    def __init__(self, job: JobSpec, parser: OutputParser, toolbox: Toolbox | None = None,
                 render: Render | None = None,
                 window: Callable[[], int | None] = lambda: None):
        if job.rollout is not None and toolbox is None:
            raise ValueError("a rollout job's pipeline needs its toolbox (Toolbox.open)")
        self.job = job
        self.spec = job.rollout
        self.toolbox = toolbox
        self.parser = parser
        self.tools = toolbox.schemas() if toolbox is not None else []
        self._names = {t["function"]["name"] for t in self.tools}
        # Open conversations beyond those the engine and the tool pool can serve would only
        # wait: new rows enter while fewer are open, so memory stays bounded.
        self.limit = (job.engine.max_in_flight + self.spec.max_concurrent_tools
                      if self.spec is not None else None)
        self._open: set[tuple[int, int]] = set()
        self._at_tools = 0
        # A conversation whose tools returned; or (None) whose state is now written.
        self._results: queue.Queue[tuple[Conversation, list[ToolResult] | None]] = queue.Queue()
        self._back: deque[tuple[Conversation, list[ToolResult] | None]] = deque()
        self._render = render
        # One thread: a tokenizer is not shared between threads (engine.py, _own_copy).
        self._renderer = (ThreadPoolExecutor(1, thread_name_prefix="thinkbatch-render")
                          if render is not None and self.spec is not None else None)
        self.rerendered = 0  # turns whose template rewrote the previous prompt (history.py)
        self._window = window  # the engine's max_model_len, where it has one
        self.results_hidden = 0  # tool results hidden to fit the context (context.py)
        # Open conversations are saved between turns (rollout.checkpoint_seconds); at every
        # turn boundary (0), a conversation's next turn waits until its state is written.
        self.saving = self.spec is not None and self.spec.checkpoint_seconds is not None
        self.durable = self.saving and self.spec is not None and self.spec.checkpoint_seconds == 0

    # -- feeder thread ----------------------------------------------------------------

    def prepare(self, req: RowRequest) -> RowRequest:
        """Offer the toolbox's tools beside the row's (or the job's): a name in both would
        be two tools the model cannot tell apart, so that row is invalid_input."""
        if req.error is not None or self.spec is None:
            return req
        own = req.tools or []
        clash = sorted({t["function"]["name"] for t in own} & self._names)
        if clash:
            req.error = (f"tools: {', '.join(clash)} also named by rollout.tools; a tool "
                         "name must be one tool")
        else:
            req.tools = [*own, *self.tools]
        return req

    def conversation(self, shard_id: int, req: RowRequest, sample: int) -> Conversation:
        if self.spec is None:
            return Conversation(shard_id, req, sample)  # its history is the request's
        return Conversation(shard_id, req, sample, messages=list(req.messages or ()))

    def resume(self, conv: Conversation, state: bytes) -> None:
        """Continue a conversation from its saved state (a run that was killed or stopped):
        its next turn is rendered ahead from the saved messages (tool results hidden as
        they were, rollout.context), on the render thread. A state of another row (an
        input changed under --force-resume) is ignored."""
        saved = json.loads(state)
        if self.spec is None or saved["row_id"] != conv.req.row_id or conv.req.error:
            return
        conv.messages = saved["messages"]
        conv.turns = [Turn.of_state(t) for t in saved["turns"]]
        if saved.get("results_in_messages"):
            results = [r for t in conv.turns for r in t.results or ()]
            for r, m in zip(results, _result_messages(conv.messages, len(results))):
                if r.content is None:
                    r.content = m.get("content")
        conv.malformed = saved["malformed"]
        conv.started = time.monotonic() - saved["elapsed_s"]
        # A state saved before it was kept: as long ago as the conversation has run.
        conv.started_at = saved.get("started_at", time.time() - saved["elapsed_s"])
        if self._renderer is not None and self._render is not None:
            req = dataclasses.replace(conv.req, messages=conv.messages)
            try:
                conv.history = self._renderer.submit(self._render, req, None).result()
                self._renderer.submit(self._fit, conv, req).result()
            except Exception as e:  # left to the driver's full render (see _next_turn)
                log.debug("row %s: rendering its resumed turn ahead failed: %s",
                          conv.req.row_id, e)

    # -- driver thread ----------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self._open) >= self.limit

    @property
    def at_tools(self) -> bool:
        """Some conversation waits for its tools (results queued count until taken)."""
        return self._at_tools > 0

    def turn(self, conv: Conversation) -> int | None:
        """The number of the turn being generated, from 1 (a rollout's; None for a
        single-turn job, whose trace names no turn)."""
        return len(conv.turns) + 1 if self.spec is not None else None

    def request(self, conv: Conversation) -> RowRequest:
        """The request of the conversation's next turn: its whole history."""
        if self.spec is None:
            return conv.req
        if conv.started is None:
            conv.started, conv.started_at = time.monotonic(), time.time()
        self._open.add((conv.req.row_index, conv.sample))
        return dataclasses.replace(conv.req, messages=conv.messages, prompt=conv.history)

    def turn_done(self, conv: Conversation, gen: Generation,
                  gave_up: Parsed | None) -> Parsed | None:
        """The conversation's end (its row's parse), or None when its tools now run.
        `gave_up`: the engine finished the turn with abort or error. A single-turn job's
        conversation ends here, tool calls or not."""
        parsed = gave_up or self._parse(conv.req, gen)
        if self.spec is None:
            return parsed
        conv.turns.append(Turn.of(gen, parsed))
        n = len(conv.turns)
        if self._malformed(parsed):
            conv.malformed += 1
            if conv.malformed <= self.spec.max_malformed_turns:
                parsed = dataclasses.replace(parsed, status=Status.OK, error=None)
                conv.turns[-1].parsed = parsed
            else:
                return dataclasses.replace(
                    parsed, error=f"turn {n}: {parsed.error} ({conv.malformed} malformed "
                                  f"turns in a row, rollout.max_malformed_turns "
                                  f"{self.spec.max_malformed_turns})")
        else:
            conv.malformed = 0
        if parsed.status is not Status.OK:
            return dataclasses.replace(parsed, error=f"turn {n}: {parsed.error}")
        conv.messages.append(assistant_message(parsed))
        if not parsed.tool_calls:
            return parsed
        if n >= self.spec.max_turns:
            return dataclasses.replace(
                parsed, status=Status.MAX_TURNS,
                error=f"turn {n}: still calling tools after rollout.max_turns ({n}) turns")
        self._at_tools += 1
        assert self.toolbox is not None
        self.toolbox.run(parsed.tool_calls, conv.req.recorded,
                         lambda results: self._returned(conv, results))
        return None

    # -- tool and render threads ------------------------------------------------------

    def _returned(self, conv: Conversation, results: list[ToolResult]) -> None:
        """A conversation's tools returned (a tool thread): its next prompt is rendered on
        the render thread. A pipeline that closed leaves it to a rerun."""
        if self._renderer is None:
            self._next_turn(conv, results)
            return
        try:
            self._renderer.submit(self._next_turn, conv, results)
        except RuntimeError:  # the render thread was shut down: the pipeline closed
            pass

    def _next_turn(self, conv: Conversation, results: list[ToolResult]) -> None:
        """The results join the history and the next turn's prompt is rendered from the
        previous one; then the driver may take the conversation. A render that fails is
        left to the driver's full render, which fails the row with its reason."""
        try:
            conv.messages.extend(tool_message(r) for r in results)
            conv.turns[-1].results = results
            going_on = self.toolbox.unavailable(results) is None
            if self._render is not None and going_on:
                try:
                    req = dataclasses.replace(conv.req, messages=conv.messages)
                    conv.history = self._render(req, conv.history)
                    self._fit(conv, req)
                except Exception as e:
                    log.debug("row %s: rendering its next turn ahead failed: %s",
                              conv.req.row_id, e)
                    conv.history = None
            if self.saving and going_on:  # the messages as the next turn reads them
                conv.state = self._state(conv)
        finally:
            self._results.put((conv, results))

    def _fit(self, conv: Conversation, req: RowRequest) -> None:
        """Under `rollout.context: hide_tool_results`, a prompt past the budget has earlier
        tool results hidden (in the conversation's messages) and is rendered again."""
        assert self.spec is not None and self._render is not None
        spec, render = self.spec.context, self._render
        if spec.policy != "hide_tool_results" or conv.history is None:
            return
        floor = (req.sampling.min_room_tokens if req.sampling is not None
                 else req.min_room_tokens)
        limit = context.budget(spec, self._window(), floor)
        if limit is None or len(conv.history) <= limit:
            return
        conv.history, conv.hidden = context.fit(
            conv.history, conv.messages, lambda prev: render(req, prev), limit,
            spec.keep_last)

    @staticmethod
    def _state(conv: Conversation) -> bytes:
        """What a rerun resumes the conversation from (`resume`): its turns, tool results
        in, and the history they make. A result whose text is its tool message's (not
        hidden) is saved once, in the message (`_result_messages`)."""
        assert conv.started is not None
        turns = [t.state() for t in conv.turns]
        results = [r for t in turns for r in t["results"] or ()]
        for r, m in zip(results, _result_messages(conv.messages, len(results))):
            if r[2] is m.get("content"):
                r[2] = None
        return json.dumps({"row_id": conv.req.row_id, "messages": conv.messages,
                           "turns": turns, "malformed": conv.malformed,
                           "elapsed_s": time.monotonic() - conv.started,
                           "started_at": conv.started_at, "results_in_messages": True},
                          ensure_ascii=False, default=str).encode()

    def close(self) -> None:
        """Stop the render thread; conversations it still holds are left to a rerun."""
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _malformed(parsed: Parsed) -> bool:
        """A turn whose only fault is a tool call's arguments: its calls run, the toolbox
        answers each malformed one with the error text as its tool message."""
        return (parsed.status is Status.PARSE_ERROR and bool(parsed.tool_calls)
                and parsed.error == arguments_problem(parsed.tool_calls))

    def _parse(self, req: RowRequest, gen: Generation) -> Parsed:
        """The one parse of a turn: the text split by the job's parsers, then a final
        answer checked against the structured outputs' JSON schema (the row's sampling,
        else the job's). A rollout turn that calls tools is no final answer: unchecked."""
        so = (req.sampling or self.job.sampling).structured_outputs
        parsed = self.parser.parse(gen, req.tools, req.chat_template_kwargs)
        if (so is not None and so.json_schema is not None and parsed.status is Status.OK
                and not (self.spec is not None and parsed.tool_calls)):
            problem = schema_problem(parsed.answer, so.json_schema)
            if problem:
                parsed.status, parsed.error = Status.SCHEMA_ERROR, problem
        return parsed

    def rejected(self, conv: Conversation, status: Status, error: str) -> Parsed:
        """A turn the engine would not take (its prompt outgrew max_model_len...), or
        that killed it."""
        if self.spec is None:
            return Parsed(status, error=error)
        return Parsed(status, error=f"turn {len(conv.turns) + 1}: {error}")

    def defer(self, conv: Conversation) -> None:
        """Hold a conversation whose state is being written (`durable`) until `saved`: a
        kill then never finds a turn generated after tool results that are not on disk,
        so it regenerates at most the turn whose tools ran last. Counted as at its tools,
        so the driver waits for it. Its prompt's id list is let go meanwhile (a Python
        list costs ~40 bytes a token: 4 MB at 100k tokens) and made again when due."""
        conv.saving = True
        if conv.history is not None:
            conv.history.ready = None
        self._at_tools += 1

    def saved(self, conv: Conversation) -> None:
        """The deferred conversation's state is written (the writer thread): its prompt's
        id list is made again on the render thread, then `ready` gives it back, its next
        turn due."""
        if self._renderer is not None:
            try:
                self._renderer.submit(self._due, conv)
                return
            except RuntimeError:  # the render thread was shut down: the pipeline closed
                pass
        self._results.put((conv, None))

    def _due(self, conv: Conversation) -> None:
        try:
            if conv.history is not None and conv.history.ready is None:
                conv.history.ready = conv.history.ids.tolist()
        finally:
            self._results.put((conv, None))

    def ready(self) -> Conversation | None:
        """A conversation whose tools returned, its results in its history; else None.
        One that met a tool source down for good comes back refused (its request's
        error set), so that submitting it ends it `tool_error`. Raises ToolboxError
        (the job stops) once the calls fail beyond rollout.max_tool_error_rate. A
        deferred one comes back with `saving` still set, once its state is written."""
        if not self._at_tools:
            return None
        try:
            conv, results = self._back.popleft() if self._back else self._results.get_nowait()
        except queue.Empty:
            return None
        self._at_tools -= 1
        if results is None:
            return conv
        if (stop := self.toolbox.failing()) is not None:
            raise ToolboxError(stop)
        self.rerendered += conv.history is not None and conv.history.rerendered
        self.results_hidden += conv.hidden
        conv.hidden = 0
        if (why := self.toolbox.unavailable(results)) is not None:
            conv.req = dataclasses.replace(conv.req, status=Status.TOOL_ERROR,
                                           error=f"turn {len(conv.turns)}: {why}")
        return conv

    def wait(self, timeout: float) -> None:
        """Block until some conversation's tools return (or `timeout`): the engine is
        idle, and only tools can give it work."""
        try:
            self._back.append(self._results.get(timeout=timeout))
        except queue.Empty:
            pass

    def end(self, conv: Conversation) -> Trajectory | None:
        """The finished conversation's trajectory (None for a single-turn job, or if no
        turn was generated)."""
        if self.spec is None:
            return None
        self._open.discard((conv.req.row_index, conv.sample))
        conv.history = None
        if not conv.turns:
            return None
        assert conv.started is not None
        return Trajectory(conv.messages, conv.turns, time.monotonic() - conv.started,
                          conv.started_at, time.time())
