"""MCP servers as tool sources: a stdio command that the toolbox starts (and stops) or the
URL of a running streamable-HTTP server. Every session lives in one task on the toolbox's
event loop, from the start to the toolbox's close (the `mcp` package is async, and a
session must be entered and left by one task)."""

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
from thinkbatch.tasks.tools.secrets import Secrets, resolved_env, resolved_url
from thinkbatch.tasks.tools.slots import Slot
from thinkbatch.tasks.tools.tool import Tool, ToolboxError, ToolFailed, function_schema, untitled

log = logging.getLogger("thinkbatch.toolbox")

OPEN_TIMEOUT_S = 60.0  # start every MCP server, initialize, list its tools

Sources = list[tuple[int, str, ToolSource]]  # (index in rollout.tools, where, source)
Ready = concurrent.futures.Future[list[tuple[int, Tool]]]


async def serve(sources: Sources, base_dir: Path, ready: Ready, stop: asyncio.Event,
                secrets: Secrets) -> None:
    """Connect to every server and list its tools (`ready` gets them, or the error of the
    first that failed), then keep the sessions until `stop`."""
    import anyio

    at = sources[0][1]
    try:
        # One scope around the sessions' whole life (anyio scopes must nest): its
        # deadline bounds the start only and is lifted once all are listed.
        with anyio.CancelScope(deadline=anyio.current_time() + OPEN_TIMEOUT_S) as scope:
            async with AsyncExitStack() as stack:
                tools = []
                for i, at, source in sources:
                    assert source.mcp is not None
                    session = await _connect(stack, source.mcp, base_dir)
                    tools += [(i, t) for t in await _mcp_tools(session, source, at)]
                scope.deadline = math.inf
                ready.set_result(tools)
                await stop.wait()
        if scope.cancelled_caught and not ready.done():
            ready.set_exception(ToolboxError(
                f"{at}: did not start within {OPEN_TIMEOUT_S:g} s"))
    except BaseException as e:
        leaf = _leaf(e)
        what = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        if ready.done():
            log.warning("toolbox: an MCP session ended: %s", secrets.scrub(what))
        elif isinstance(leaf, ToolboxError):
            ready.set_exception(leaf)
        else:
            ready.set_exception(ToolboxError(secrets.scrub(f"{at}: could not start: {what}")))
        if not isinstance(e, Exception):
            raise


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
        read, write = await stack.enter_async_context(streamable_http_client(url))
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


async def _mcp_tools(session: Any, source: ToolSource, at: str) -> list[Tool]:
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
                 source=at, call=_mcp_caller(session, t.name))
            for t in listed if source.functions is None or t.name in source.functions]


def _mcp_caller(session: Any, name: str) -> Callable[[dict[str, Any], Slot], Awaitable[str]]:
    async def call(args: dict[str, Any], slot: Slot) -> str:
        result = await session.call_tool(name, args)
        text = "\n".join(b.text if getattr(b, "type", None) == "text" else
                         b.model_dump_json(by_alias=True, exclude_none=True)
                         for b in result.content)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            raise ToolFailed(text or f"error: tool {name!r} failed")
        return text
    return call
