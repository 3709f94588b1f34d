"""The toolbox of a rollout job: the model's tool calls of one turn go in, one `ToolResult`
per call comes out, off the caller's thread.

A `Toolbox` owns one asyncio event loop in a daemon thread. MCP sessions live on it
(tools/mcp.py), and every call is scheduled on it in a slot of `max_concurrent_tools`
(tools/slots.py) under a per-call timeout. No tool's code runs on that loop: Python tools
(tools/python.py), async ones too, run each in a daemon thread of their own, so a tool
that blocks cannot stall the timeouts or the other calls; recorded results
(tools/recorded.py) answer calls by their ids.

A failing tool never fails the row: unknown tool, arguments that are not a JSON object or
do not match the tool's schema, an exception, a timeout, an MCP error result, a call with
no recorded result: each is a `ToolResult` whose `content` (= `error`) is the text the
model reads as the tool message. The error texts are scrubbed of the MCP servers' secrets
(tools/secrets.py), since they are logged and written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkbatch.schemas.record import ToolResult
from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.schemas.tools import tool_errors
from thinkbatch.tasks.tools import allowed, mcp
from thinkbatch.tasks.tools.python import python_tools
from thinkbatch.tasks.tools.recorded import recorded_result
from thinkbatch.tasks.tools.secrets import Secrets
from thinkbatch.tasks.tools.slots import Slot, Slots
from thinkbatch.tasks.tools.tool import Tool, ToolboxError, ToolFailed

log = logging.getLogger("thinkbatch.toolbox")

CLOSE_TIMEOUT_S = 15.0  # the mcp package stops a stdio server within ~6 s (stdin, TERM, KILL)
ERROR_RATE_MIN_CALLS = 20  # rollout.max_tool_error_rate is judged from this many calls on


class Toolbox:
    """The tools of a rollout job. `open` it before the model loads, `run` each turn's
    calls, `close` it at the end (or use it as a context manager).

    Thread-safe: `run` may be called from any thread, concurrently. `done` callbacks run
    on one dedicated thread, one at a time, in the order turns finish; a callback should
    be quick (hand the results over, e.g. to a queue) and must not call `close`."""

    def __init__(self, spec: RolloutSpec):
        self._timeout_s = spec.tool_timeout_s
        self._max_error_rate = spec.max_tool_error_rate
        self._calls = self._errors = 0
        self._last_error: str | None = None
        self._recorded = spec.recorded_column is not None
        self._tools: dict[str, Tool] = {}
        self._secrets = Secrets()  # the MCP servers' env values and URL credentials
        self._slots = Slots(spec.max_concurrent_tools)
        self._stop = asyncio.Event()
        self._serving: set[asyncio.Task[None]] = set()  # the MCP sessions' tasks: end at stop
        self._turns: set[concurrent.futures.Future[list[ToolResult]]] = set()
        self._turn_tasks: set[asyncio.Task[list[ToolResult]]] = set()  # on the loop
        self._lock = threading.RLock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="toolbox",
                                        daemon=True)
        self._thread.start()
        self._callbacks = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="toolbox-done")

    @classmethod
    def open(cls, spec: RolloutSpec, base_dir: Path) -> Toolbox:
        """Import the Python tools and start the MCP sessions; relative paths (a tools
        file, a stdio server's working directory) are relative to `base_dir`, the working
        directory, like every path of a job. Raises ToolboxError naming the source that failed,
        or those the machine does not allow (tools/allowed.py), before any is opened."""
        if refused := allowed.refused(spec, base_dir):
            raise ToolboxError("; ".join(refused))
        box = cls(spec)
        try:
            where = {i: f"rollout.tools[{i}] ({s.label})" for i, s in enumerate(spec.tools)}
            tools = [(i, t) for i, s in enumerate(spec.tools) if s.python is not None
                     for t in python_tools(s, base_dir, where[i])]
            servers = [(i, where[i], s) for i, s in enumerate(spec.tools) if s.mcp is not None]
            box._secrets = Secrets.of((at, s.mcp) for _, at, s in servers if s.mcp)
            if servers:
                tools += box._start_mcp(servers, base_dir)
            box._add([t for _, t in sorted(tools, key=lambda it: it[0])])  # in source order
        except BaseException:
            box.close()
            raise
        return box

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI tool schemas of the live tools (python and MCP), for the chat template.
        A recorded source has none: its tools are described by the job's or the row's
        `tools`."""
        return [copy.deepcopy(t.schema) for t in self._tools.values()]

    def unavailable(self, results: list[ToolResult]) -> str | None:
        """Why a conversation cannot go on as its data means: a call failed because its
        source is down for good (an MCP server that no restart brought back); else None."""
        for r in results:
            tool = self._tools.get(r.name)
            if r.error is not None and tool is not None and (why := tool.down()) is not None:
                return f"tool {r.name!r} is unavailable: {why}"
        return None

    def failing(self) -> str | None:
        """Why the job should stop: more than `rollout.max_tool_error_rate` of the calls
        so far failed (once ERROR_RATE_MIN_CALLS ran); else None."""
        with self._lock:
            calls, errors, last = self._calls, self._errors, self._last_error
        rate = self._max_error_rate
        if rate is None or calls < ERROR_RATE_MIN_CALLS or errors <= rate * calls:
            return None
        return (f"rollout.max_tool_error_rate ({rate:g}) exceeded: {errors} of {calls} tool "
                f"calls failed ({errors / calls:.0%}); the job stops, its open conversations "
                f"are not written (a rerun resumes them). The last error: {last}")

    def run(self, calls: list[dict[str, Any]], recorded: Any | None,
            done: Callable[[list[ToolResult]], None]) -> None:
        """Run one turn's `calls` (the parser's `{id, name, arguments}`, arguments a JSON
        text) and return at once; `done(results)` follows exactly once, with one result
        per call in call order. `recorded` is the row's recorded-results value (see
        tools/recorded.py), None without a recorded source."""
        with self._lock:
            if self._closed:
                raise ToolboxError("the toolbox is closed")
            turn = asyncio.run_coroutine_threadsafe(self._turn(calls, recorded), self._loop)
            self._turns.add(turn)
            # Under the lock, so that close() cannot stop the callbacks in between.
            turn.add_done_callback(lambda f: self._finish(f, calls, done))

    def close(self) -> None:
        """Stop the MCP sessions (a stdio server is stopped with them) and the loop. Turns
        still running are cancelled: their calls end as errors and their `done` is called
        before close returns. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._turns)
        for turn in running:
            turn.cancel()
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(
                    CLOSE_TIMEOUT_S)
            except Exception:  # a server that would not stop: the process exit ends it
                log.exception("toolbox: closing the MCP sessions failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        self._callbacks.shutdown(wait=True)

    def __enter__(self) -> Toolbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- on the loop ---------------------------------------------------------------------

    async def _turn(self, calls: list[dict[str, Any]], recorded: Any) -> list[ToolResult]:
        task = asyncio.current_task()
        assert task is not None
        self._turn_tasks.add(task)
        try:
            return list(await asyncio.gather(*(self._call(c, recorded) for c in calls)))
        finally:
            self._turn_tasks.discard(task)

    async def _call(self, call: dict[str, Any], recorded: Any) -> ToolResult:
        call_id, name = str(call.get("id") or ""), str(call.get("name") or "")
        start = time.perf_counter()
        try:
            tool = self._tools.get(name)
            if tool is None:
                if not self._recorded:
                    raise ToolFailed(f"error: unknown tool {name!r}")
                content = recorded_result(recorded, call_id, name)
            else:
                args = _arguments(call.get("arguments"), name)
                slot = await self._slots.take(name)
                try:
                    start = time.perf_counter()
                    content = await self._timed(tool, name, args, slot)
                finally:
                    slot.call_over()
        except ToolFailed as e:
            text = self._secrets.scrub(str(e))
            return ToolResult(call_id, name, text, text, time.perf_counter() - start)
        return ToolResult(call_id, name, content, None, time.perf_counter() - start)

    async def _timed(self, tool: Tool, name: str, args: dict[str, Any], slot: Slot) -> str:
        async def guarded() -> str:
            """The tool's own exceptions (a TimeoutError too) become its error text."""
            try:
                return await tool.call(args, slot)
            except ToolFailed:
                raise
            except Exception as e:
                raise ToolFailed(f"error: tool {name!r} failed: {type(e).__name__}: {e}") from e

        try:
            return await asyncio.wait_for(guarded(), self._timeout_s)
        except asyncio.TimeoutError:
            raise ToolFailed(
                f"error: tool {name!r} timed out after {self._timeout_s:g} s") from None

    def _finish(self, turn: concurrent.futures.Future[list[ToolResult]],
                calls: list[dict[str, Any]], done: Callable[[list[ToolResult]], None]) -> None:
        with self._lock:
            self._turns.discard(turn)
        if turn.cancelled():
            results = [_failed(c, "was cancelled: the toolbox closed") for c in calls]
        elif turn.exception() is not None:  # a bug here, not a tool's failure
            log.error("toolbox: a turn failed", exc_info=turn.exception())
            results = [_failed(c, f"failed: {turn.exception()!r}") for c in calls]
        else:
            results = turn.result()
        with self._lock:
            self._calls += len(results)
            for r in results:
                if r.error is not None:
                    self._errors += 1
                    self._last_error = r.error
        self._callbacks.submit(_deliver, done, results)

    def _add(self, tools: list[Tool]) -> None:
        """Tool names must be unique across sources: a call must have one meaning."""
        for tool in tools:
            name = tool.schema["function"]["name"]
            if name in self._tools:
                raise ToolboxError(f"{tool.source}: tool {name!r} is also served by "
                                   f"{self._tools[name].source}; tool names must be unique")
            if problems := tool_errors([tool.schema], f"tool {name!r}"):
                raise ToolboxError(f"{tool.source}: " + "; ".join(problems))
            self._tools[name] = tool

    def _start_mcp(self, sources: mcp.Sources, base_dir: Path) -> list[tuple[int, Tool]]:
        """Connect to every MCP server in one long-lived task that keeps the sessions
        until close; wait until they are listed (or one failed)."""
        ready: mcp.Ready = concurrent.futures.Future()
        asyncio.run_coroutine_threadsafe(self._serve(sources, base_dir, ready), self._loop)
        try:
            return ready.result(mcp.OPEN_TIMEOUT_S + 5)
        except concurrent.futures.TimeoutError:
            raise ToolboxError(
                f"MCP servers did not start within {mcp.OPEN_TIMEOUT_S:g} s") from None

    async def _serve(self, sources: mcp.Sources, base_dir: Path, ready: mcp.Ready) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        await mcp.serve(sources, base_dir, ready, self._stop, self._secrets, self._serving)

    async def _shutdown(self) -> None:
        """End the turns still running, then the sessions and the worker processes, so
        the loop stops with no task pending."""
        self._stop.set()
        if self._turn_tasks:  # cancelled by close: let them clean up (an isolated worker)
            await asyncio.wait(self._turn_tasks, timeout=CLOSE_TIMEOUT_S)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            if task not in self._serving:
                task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.gather(*(close() for close in
                               {t.close for t in self._tools.values() if t.close is not None}))
        await self._loop.shutdown_asyncgens()


def _deliver(done: Callable[[list[ToolResult]], None], results: list[ToolResult]) -> None:
    try:
        done(results)
    except Exception:
        log.exception("toolbox: a done callback raised")


def _failed(call: dict[str, Any], reason: str) -> ToolResult:
    name = str(call.get("name") or "")
    text = f"error: tool {name!r} {reason}"
    return ToolResult(str(call.get("id") or ""), name, text, text, 0.0)


def _arguments(raw: Any, name: str) -> dict[str, Any]:
    """A call's arguments: a JSON object text (an empty text is `{}`)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise ToolFailed(f"error: arguments of {name!r} are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ToolFailed(f"error: arguments of {name!r} must be a JSON object, "
                         f"not {type(value).__name__}")
    return value
