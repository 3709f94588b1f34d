"""MCP servers as tool sources: a stdio command that the toolbox starts (and stops) or the
URL of a running streamable-HTTP server. Each server's session lives in a task of its own
on the toolbox's event loop (`Server.keep`), from the start to the toolbox's close (the
`mcp` package is async, and a session must be entered and left by one task).

A session that is lost (a stdio server that exited, an HTTP server gone or that forgot
the session) is started again, with backoff, each restart logged with the server's name.
The call that met the loss fails (it may have run before the server died, so it is not
repeated); calls after it wait for the new session within their timeout; an idle session
is pinged every `HEALTH_S`, so that a server that died between calls is back before the
next one. Restarts are bounded: after `max_restarts` losses with no call served in
between, the source is down for good, its calls fail at once saying why, and a
conversation that met it ends `tool_error` (tasks/rows/conversation.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from thinkbatch.schemas.rollout import McpServerSpec, ToolSource
from thinkbatch.tasks.tools.secrets import (Secrets, resolved_env, resolved_headers,
                                            resolved_url)
from thinkbatch.tasks.tools.slots import Slot
from thinkbatch.tasks.tools.tool import Tool, ToolboxError, ToolFailed, function_schema, untitled

log = logging.getLogger("thinkbatch.toolbox")

OPEN_TIMEOUT_S = 60.0  # start an MCP server, initialize, list its tools
HEALTH_S = 2.0  # an idle session is pinged this often
PING_TIMEOUT_S = 10.0  # a ping not answered by then: a busy server, not a lost one
BACKOFF_S, BACKOFF_MAX_S = 0.5, 30.0  # the wait before restart k: 0.5 * 2**(k-1) s, capped
SESSION_GONE = ("Session terminated", "Session not found")  # an HTTP server forgot the session

Sources = list[tuple[int, str, ToolSource]]  # (index in rollout.tools, where, source)
Ready = concurrent.futures.Future[list[tuple[int, Tool]]]


async def serve(sources: Sources, base_dir: Path, ready: Ready, stop: asyncio.Event,
                secrets: Secrets, tasks: set[asyncio.Task[None]]) -> None:
    """Start every server, each kept by a task of its own (added to `tasks`, which the
    toolbox leaves to end at `stop`); `ready` gets their tools in source order, or the
    error of the first that could not start."""
    loop = asyncio.get_running_loop()
    servers = [Server(i, at, source, base_dir, secrets) for i, at, source in sources]
    firsts: list[asyncio.Future[list[Tool]]] = [loop.create_future() for _ in servers]
    kept = [loop.create_task(s.keep(first, stop)) for s, first in zip(servers, firsts)]
    tasks.update(kept)
    try:
        listed = await asyncio.gather(*firsts)
    except ToolboxError as e:
        stop.set()
        await asyncio.gather(*kept, return_exceptions=True)
        ready.set_exception(e)
        return
    ready.set_result([(s.index, t) for s, tools in zip(servers, listed) for t in tools])
    await asyncio.gather(*kept, return_exceptions=True)


class Server:
    """One MCP source, its session kept up as the module's docstring says."""

    def __init__(self, index: int, at: str, source: ToolSource, base_dir: Path,
                 secrets: Secrets):
        assert source.mcp is not None
        self.index, self.at, self.source, self.base_dir = index, at, source, base_dir
        self.spec: McpServerSpec = source.mcp
        self.secrets = secrets
        self.down: str | None = None  # why the source is down for good
        self._session: Any = None
        self._generation = 0  # sessions started so far
        self._losses = 0  # lost (or failed to start) since the last call served
        self._settled = asyncio.Event()  # a session is up, or the source is down
        self._lost: str | None = None  # a call found the current session lost: why
        self._wake = asyncio.Event()  # the keeper looks again: a loss reported, or stop

    async def keep(self, first: asyncio.Future[list[Tool]], stop: asyncio.Event) -> None:
        """Start the session, list the tools (`first`), then keep it until `stop`,
        starting it again each time it is lost, while restarts are left."""
        import anyio

        stopper = asyncio.get_running_loop().create_task(self._stop_on(stop))
        try:
            while not stop.is_set():
                why, up = None, False
                try:
                    # One scope around the session's whole life (anyio scopes must nest):
                    # its deadline bounds the start only, and is lifted once it is up.
                    with anyio.CancelScope(
                            deadline=anyio.current_time() + OPEN_TIMEOUT_S) as scope:
                        async with AsyncExitStack() as stack:
                            session = await _connect(stack, self.spec, self.base_dir)
                            tools = (await _mcp_tools(session, self.source, self.at, self)
                                     if not first.done() else [])
                            scope.deadline = math.inf
                            self._up(session)
                            up = True
                            if not first.done():
                                first.set_result(tools)
                            why = await self._watch(session, stop)
                            self._session = None
                            self._settled.clear()
                    if scope.cancelled_caught:
                        why = f"could not start within {OPEN_TIMEOUT_S:g} s"
                except Exception as e:  # anyio's exception groups too
                    if not first.done():
                        leaf = _leaf(e)
                        first.set_exception(leaf if isinstance(leaf, ToolboxError) else
                                            ToolboxError(self.secrets.scrub(
                                                f"{self.at}: could not start: {_what(e)}")))
                    why = why or (_what(e) if up else f"could not start: {_what(e)}")
                self._session = None
                self._settled.clear()
                if not first.done():
                    first.set_exception(ToolboxError(f"{self.at}: {why}"))
                if first.exception() is not None:
                    return
                if stop.is_set() or not await self._backoff(why or "ended", stop):
                    return
        finally:
            stopper.cancel()
            self._session = None
            self._settled.set()  # no call waits for a session that will not come

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def _up(self, session: Any) -> None:
        self._session, self._lost = session, None
        self._generation += 1
        self._settled.set()
        if self._generation > 1:
            log.warning("toolbox: %s: the MCP server is back (restart %d of at most %d)",
                        self.at, self._losses, self.spec.max_restarts)

    async def _watch(self, session: Any, stop: asyncio.Event) -> str | None:
        """Until `stop` (None) or the session is lost (why): a call reported it, or a
        ping of the idle session found it closed."""
        import anyio

        warned = False
        while True:
            self._wake.clear()
            if stop.is_set():
                return None
            if self._lost is not None:
                return self._lost
            try:
                await asyncio.wait_for(self._wake.wait(), HEALTH_S)
                continue
            except asyncio.TimeoutError:
                pass
            try:
                with anyio.fail_after(PING_TIMEOUT_S):
                    await session.send_ping()
            except TimeoutError:
                continue
            except Exception as e:
                if _lost(e):
                    return _what(e)
                if not warned:  # once per session: the calls say the rest
                    log.warning("toolbox: %s: ping failed: %s", self.at,
                                self.secrets.scrub(_what(e)))
                    warned = True

    async def _backoff(self, why: str, stop: asyncio.Event) -> bool:
        """Wait before the next restart (False: none is left, the source is down, or
        `stop`)."""
        self._losses += 1
        why = self.secrets.scrub(why)
        limit = self.spec.max_restarts
        if self._losses > limit:
            self.down = (f"the MCP server {self.at} stopped ({why}) and was restarted "
                         f"{limit} times without serving a call")
            log.error("toolbox: %s: the MCP server stopped (%s); no restart left (%d "
                      "without serving a call): its tools fail from now on", self.at, why,
                      limit)
            return False
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (self._losses - 1))
        log.warning("toolbox: %s: the MCP server stopped (%s); restarting it in %.1f s "
                    "(restart %d of at most %d)", self.at, why, delay, self._losses, limit)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return False
        except asyncio.TimeoutError:
            return True

    async def session(self, name: str) -> tuple[Any, int]:
        """The session a call goes to (waiting while the server restarts)."""
        while True:
            if self.down is not None:
                raise ToolFailed(f"error: tool {name!r} is unavailable: {self.down}")
            if self._session is not None and self._lost is None:
                return self._session, self._generation
            if self._settled.is_set() and self._session is None:  # the keeper has ended
                raise ToolFailed(f"error: tool {name!r} is unavailable: {self.at} is closed")
            await self._settled.wait()

    def lost(self, generation: int, why: str) -> None:
        """A call found session `generation` lost."""
        if generation == self._generation and self._lost is None:
            self._lost = why
            self._settled.clear()  # calls wait for the next session
            self._wake.set()

    def served(self) -> None:
        self._losses = 0


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside anyio's exception groups."""
    while getattr(e, "exceptions", None):
        e = e.exceptions[0]  # type: ignore[attr-defined]
    return e


async def _connect(stack: AsyncExitStack, server: McpServerSpec, base_dir: Path) -> Any:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if (url := resolved_url(server)) is not None:
        client = None
        if headers := resolved_headers(server):
            from mcp.shared._httpx_utils import create_mcp_http_client
            client = await stack.enter_async_context(create_mcp_http_client(headers=headers))
        read, write = await stack.enter_async_context(
            streamable_http_client(url, http_client=client))
    else:
        assert server.command is not None
        command, *args = server.command
        if command in ("python", "python3"):  # the interpreter (and venv) running the job
            command = sys.executable
        params = StdioServerParameters(command=command, args=args,
                                       env=resolved_env(server) or None, cwd=base_dir)
        read, write = await stack.enter_async_context(stdio_client(params))
    session = await stack.enter_async_context(ClientSession(read, write))
    await session.initialize()
    return session


async def _mcp_tools(session: Any, source: ToolSource, at: str, server: Server) -> list[Tool]:
    import mcp_types

    listed, cursor = [], None
    while True:
        page = await session.list_tools(
            params=mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        listed += page.tools
        if not (cursor := page.next_cursor):
            break
    by_name = {t.name: t for t in listed}
    for name in source.functions or []:
        if name not in by_name:
            raise ToolboxError(f"{at}: the server has no tool {name!r} "
                               f"(it has: {', '.join(by_name) or 'none'})")
    return [Tool(schema=function_schema(t.name, t.description or "",
                                        untitled(t.input_schema)),
                 source=at, call=_mcp_caller(server, t.name), down=lambda: server.down)
            for t in listed if source.functions is None or t.name in source.functions]


def _mcp_caller(server: Server, name: str) -> Callable[[dict[str, Any], Slot], Awaitable[str]]:
    async def call(args: dict[str, Any], slot: Slot) -> str:
        session, generation = await server.session(name)
        try:
            result = await session.call_tool(name, args)
        except Exception as e:
            if not _lost(e):
                raise
            server.lost(generation, _what(e))
            raise ToolFailed(
                f"error: tool {name!r} failed: the MCP server {server.at} was lost during "
                f"the call ({_what(e)}); it is being restarted, the call is not repeated"
            ) from None
        server.served()
        text = "\n".join(b.text if getattr(b, "type", None) == "text" else
                         b.model_dump_json(by_alias=True, exclude_none=True)
                         for b in result.content)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            raise ToolFailed(text or f"error: tool {name!r} failed")
        return text
    return call


def _lost(e: BaseException) -> bool:
    """An error that says the session is gone, not that the call failed."""
    import anyio
    import httpx2
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST

    leaf = _leaf(e)
    if isinstance(leaf, MCPError):  # an HTTP 404 on a session: the client's or the server's word
        return leaf.code == CONNECTION_CLOSED or (
            leaf.code == INVALID_REQUEST and leaf.error.message in SESSION_GONE)
    return isinstance(leaf, (anyio.BrokenResourceError, anyio.ClosedResourceError,
                             anyio.EndOfStream, httpx2.TransportError))


def _what(e: BaseException) -> str:
    leaf = _leaf(e)
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
