"""Tool executors for agentic rollouts: the model's tool calls of one turn go in, one
`ToolResult` per call comes out, off the caller's thread.

A `Toolbox` owns one asyncio event loop in a daemon thread. MCP sessions live on it (the
`mcp` package is async, and a session must be entered and left by one task), and every
call is scheduled on it under one semaphore (`max_concurrent_tools`) and a per-call
timeout. Sync Python tools run each in a daemon thread of their own, so a tool that hangs
is abandoned at its timeout without holding a slot or blocking the process's exit.

A failing tool never fails the row: unknown tool, arguments that are not a JSON object or
do not match the tool's schema, an exception, a timeout, an MCP error result, a call with
no recorded result: each is a `ToolResult` whose `content` (= `error`) is the text the
model reads as the tool message. The error texts are scrubbed of the MCP servers' secrets
(env values, URL credentials), since they are logged and written.

The job's checks open the toolbox before the model loads and keep it for the run in the
same process (`Toolbox.keep`, `Toolbox.take`), so a run starts each MCP server once.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from thinkbatch.schemas.record import ToolResult
from thinkbatch.schemas.rollout import MASK, McpServerSpec, RolloutSpec, ToolSource
from thinkbatch.schemas.tools import tool_errors

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 60.0  # start every MCP server, initialize, list its tools
SECRET_MIN_CHARS = 8  # shorter env values (DEBUG=1) are no keys: scrubbing them garbles text
CLOSE_TIMEOUT_S = 15.0  # the mcp package stops a stdio server within ~6 s (stdin, TERM, KILL)


class ToolboxError(RuntimeError):
    """A tool source that cannot be opened (or a closed toolbox): the job is refused
    before the model loads."""


class _ToolFailed(Exception):
    """A call failed; the message is the whole text the model sees."""


@dataclass(frozen=True, slots=True)
class _Tool:
    schema: dict[str, Any]  # OpenAI function tool
    source: str  # where it comes from, for messages
    call: Callable[[dict[str, Any]], Awaitable[str]]  # on the toolbox's loop


class Toolbox:
    """The tools of a rollout job. `open` it before the model loads, `run` each turn's
    calls, `close` it at the end (or use it as a context manager).

    Thread-safe: `run` may be called from any thread, concurrently. `done` callbacks run
    on one dedicated thread, one at a time, in the order turns finish; a callback should
    be quick (hand the results over, e.g. to a queue) and must not call `close`."""

    def __init__(self, spec: RolloutSpec):
        self._timeout_s = spec.tool_timeout_s
        self._recorded = spec.recorded_column is not None
        self._tools: dict[str, _Tool] = {}
        self._secrets: list[str] = []  # MCP env values and URL credentials, longest first
        self._slots = asyncio.Semaphore(spec.max_concurrent_tools)
        self._stop = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._turns: set[concurrent.futures.Future[list[ToolResult]]] = set()
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
        directory, like every path of a job. Raises ToolboxError naming the source that failed."""
        box = cls(spec)
        try:
            where = {i: f"rollout.tools[{i}] ({s.label})" for i, s in enumerate(spec.tools)}
            tools = [(i, t) for i, s in enumerate(spec.tools) if s.python is not None
                     for t in _python_tools(s, base_dir, where[i])]
            mcp = [(i, where[i], s) for i, s in enumerate(spec.tools) if s.mcp is not None]
            box._secrets = _secrets(mcp)
            if mcp:
                tools += box._start_mcp(mcp, base_dir)
            box._add([t for _, t in sorted(tools, key=lambda it: it[0])])  # in source order
        except BaseException:
            box.close()
            raise
        return box

    @classmethod
    def keep(cls, spec: RolloutSpec, base_dir: Path) -> Toolbox:
        """`open` for the job's checks, the toolbox then kept open for the run of the same
        job in this process (`take`): each MCP server starts once per run, not once for
        the checks and again for the run. Checking the job again (the flow checks what the
        CLI checked) finds it kept. One toolbox is kept at a time; one never taken is
        closed at exit."""
        return _KEPT.get(spec, base_dir) or _KEPT.put(spec, base_dir, cls.open(spec, base_dir))

    @classmethod
    def take(cls, spec: RolloutSpec, base_dir: Path) -> Toolbox:
        """The toolbox `keep` holds for this job, now the caller's to close; else a new one."""
        return _KEPT.get(spec, base_dir, take=True) or cls.open(spec, base_dir)

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

    def run(self, calls: list[dict[str, Any]], recorded: Any | None,
            done: Callable[[list[ToolResult]], None]) -> None:
        """Run one turn's `calls` (the parser's `{id, name, arguments}`, arguments a JSON
        text) and return at once; `done(results)` follows exactly once, with one result
        per call in call order. `recorded` is the row's recorded-results value (see
        `parse_recorded`), None without a recorded source."""
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
        return list(await asyncio.gather(*(self._call(c, recorded) for c in calls)))

    async def _call(self, call: dict[str, Any], recorded: Any) -> ToolResult:
        call_id, name = str(call.get("id") or ""), str(call.get("name") or "")
        start = time.perf_counter()
        try:
            tool = self._tools.get(name)
            if tool is None:
                if not self._recorded:
                    raise _ToolFailed(f"error: unknown tool {name!r}")
                content = _recorded_result(recorded, call_id, name)
            else:
                args = _arguments(call.get("arguments"), name)
                async with self._slots:
                    start = time.perf_counter()
                    content = await self._timed(tool, name, args)
        except _ToolFailed as e:
            text = self._scrub(str(e))
            return ToolResult(call_id, name, text, text, time.perf_counter() - start)
        return ToolResult(call_id, name, content, None, time.perf_counter() - start)

    async def _timed(self, tool: _Tool, name: str, args: dict[str, Any]) -> str:
        async def guarded() -> str:
            """The tool's own exceptions (a TimeoutError too) become its error text."""
            try:
                return await tool.call(args)
            except _ToolFailed:
                raise
            except Exception as e:
                raise _ToolFailed(f"error: tool {name!r} failed: {type(e).__name__}: {e}") from e

        try:
            return await asyncio.wait_for(guarded(), self._timeout_s)
        except asyncio.TimeoutError:
            raise _ToolFailed(
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
        self._callbacks.submit(_deliver, done, results)

    def _add(self, tools: list[_Tool]) -> None:
        """Tool names must be unique across sources: a call must have one meaning."""
        for tool in tools:
            name = tool.schema["function"]["name"]
            if name in self._tools:
                raise ToolboxError(f"{tool.source}: tool {name!r} is also served by "
                                   f"{self._tools[name].source}; tool names must be unique")
            if problems := tool_errors([tool.schema], f"tool {name!r}"):
                raise ToolboxError(f"{tool.source}: " + "; ".join(problems))
            self._tools[name] = tool

    # -- MCP -------------------------------------------------------------------------------

    def _start_mcp(self, sources: list[tuple[int, str, ToolSource]],
                   base_dir: Path) -> list[tuple[int, _Tool]]:
        """Connect to every MCP server in one long-lived task that keeps the sessions
        until close; wait until they are listed (or one failed)."""
        ready: concurrent.futures.Future[list[tuple[int, _Tool]]] = concurrent.futures.Future()
        asyncio.run_coroutine_threadsafe(self._serve(sources, base_dir, ready), self._loop)
        try:
            return ready.result(OPEN_TIMEOUT_S + 5)
        except concurrent.futures.TimeoutError:
            raise ToolboxError(f"MCP servers did not start within {OPEN_TIMEOUT_S:g} s") from None

    async def _serve(self, sources: list[tuple[int, str, ToolSource]], base_dir: Path,
                     ready: concurrent.futures.Future[list[tuple[int, _Tool]]]) -> None:
        import anyio

        self._serving = asyncio.current_task()
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
                    await self._stop.wait()
            if scope.cancelled_caught and not ready.done():
                ready.set_exception(ToolboxError(
                    f"{at}: did not start within {OPEN_TIMEOUT_S:g} s"))
        except BaseException as e:
            leaf = _leaf(e)
            what = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
            if ready.done():
                log.warning("toolbox: an MCP session ended: %s", self._scrub(what))
            elif isinstance(leaf, ToolboxError):
                ready.set_exception(leaf)
            else:
                ready.set_exception(ToolboxError(self._scrub(f"{at}: could not start: {what}")))
            if not isinstance(e, Exception):
                raise

    def _scrub(self, text: str) -> str:
        """An error's text without the MCP servers' secrets: it is logged or written as a
        tool result, and may quote them (an HTTP error names its URL, a server its key)."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    async def _shutdown(self) -> None:
        """End the turns still running, then the sessions, so the loop stops with no
        task pending."""
        self._stop.set()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            if task is not self._serving:
                task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._loop.shutdown_asyncgens()


class _Kept:
    """The one toolbox the checks opened and the run has not taken yet (Toolbox.keep)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._box: Toolbox | None = None

    @staticmethod
    def _of(spec: RolloutSpec, base_dir: Path) -> str:
        """The job's tools as given (secrets too: kept in memory only) and where."""
        return f"{base_dir.resolve()}\n{spec.model_dump()!r}"

    def get(self, spec: RolloutSpec, base_dir: Path, take: bool = False) -> Toolbox | None:
        with self._lock:
            box = self._box
            if box is None or box.closed or self._key != self._of(spec, base_dir):
                return None
            if take:
                self._key, self._box = None, None
            return box

    def put(self, spec: RolloutSpec, base_dir: Path, box: Toolbox) -> Toolbox:
        with self._lock:
            old, self._key, self._box = self._box, self._of(spec, base_dir), box
        if old is not None:
            old.close()
        return box

    def close(self) -> None:
        with self._lock:
            box, self._key, self._box = self._box, None, None
        if box is not None:
            box.close()


_KEPT = _Kept()
atexit.register(_KEPT.close)


def _secrets(sources: list[tuple[int, str, ToolSource]]) -> list[str]:
    """The MCP sources' secrets as their servers get them (raises ToolboxError for a
    `${VAR}` not set, or a value that was masked when the job was written)."""
    found: set[str] = set()
    for _, at, source in sources:
        assert source.mcp is not None
        try:
            found.update(s for s in source.mcp.secrets() if len(s) >= SECRET_MIN_CHARS)
        except ValueError as e:
            raise ToolboxError(f"{at}: {e}") from None
    return sorted(found, key=len, reverse=True)


def _deliver(done: Callable[[list[ToolResult]], None], results: list[ToolResult]) -> None:
    try:
        done(results)
    except Exception:
        log.exception("toolbox: a done callback raised")


def _failed(call: dict[str, Any], reason: str) -> ToolResult:
    name = str(call.get("name") or "")
    text = f"error: tool {name!r} {reason}"
    return ToolResult(str(call.get("id") or ""), name, text, text, 0.0)


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside anyio's exception groups."""
    while getattr(e, "exceptions", None):
        e = e.exceptions[0]  # type: ignore[attr-defined]
    return e


async def _connect(stack: AsyncExitStack, server: McpServerSpec, base_dir: Path) -> Any:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if (url := server.resolved_url()) is not None:
        read, write = await stack.enter_async_context(streamable_http_client(url))
    else:
        assert server.command is not None
        command, *args = server.command
        if command in ("python", "python3"):  # the interpreter (and venv) running the job
            command = sys.executable
        params = StdioServerParameters(command=command, args=args,
                                       env=server.resolved_env() or None, cwd=base_dir)
        read, write = await stack.enter_async_context(stdio_client(params))
    session = await stack.enter_async_context(ClientSession(read, write))
    await session.initialize()
    return session


async def _mcp_tools(session: Any, source: ToolSource, at: str) -> list[_Tool]:
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
    return [_Tool(schema=_function_schema(t.name, t.description or "",
                                          _untitled(t.input_schema)),
                  source=at, call=_mcp_caller(session, t.name))
            for t in listed if source.functions is None or t.name in source.functions]


def _mcp_caller(session: Any, name: str) -> Callable[[dict[str, Any]], Awaitable[str]]:
    async def call(args: dict[str, Any]) -> str:
        result = await session.call_tool(name, args)
        text = "\n".join(b.text if getattr(b, "type", None) == "text" else
                         b.model_dump_json(by_alias=True, exclude_none=True)
                         for b in result.content)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            raise _ToolFailed(text or f"error: tool {name!r} failed")
        return text
    return call


# -- Python tools ----------------------------------------------------------------------------

def _python_tools(source: ToolSource, base_dir: Path, at: str) -> list[_Tool]:
    """Each public function defined in the module (not imported into it), or those of
    `functions`, in the order written."""
    assert source.python is not None
    module = _import(source.python, base_dir, at)
    defined = {name: fn for name, fn in vars(module).items()
               if inspect.isfunction(fn) and fn.__module__ == module.__name__
               and not name.startswith("_")}
    for name in source.functions or []:
        if name not in defined:
            raise ToolboxError(f"{at}: no public function {name!r} defined there "
                               f"(it has: {', '.join(defined) or 'none'})")
    if not defined:
        raise ToolboxError(f"{at}: defines no public function")
    return [_python_tool(name, defined[name], at) for name in source.functions or defined]


def _import(ref: str, base_dir: Path, at: str) -> ModuleType:
    """A file path (`tools.py`, `lib/tools.py`; relative to base_dir) or a module name
    (`package.tools`, found on sys.path, else in base_dir)."""
    try:
        if ref.endswith(".py") or "/" in ref:
            path = (base_dir / ref).resolve()
            if not path.is_file():
                raise ToolboxError(f"{at}: no such file {path}")
            name = f"thinkbatch_tools_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # annotations and pickling look the module up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        try:
            return importlib.import_module(ref)
        except ModuleNotFoundError as e:
            if e.name != ref.split(".")[0] or str(base_dir) in sys.path:
                raise
            sys.path.append(str(base_dir))
            return importlib.import_module(ref)
    except ToolboxError:
        raise
    except Exception as e:
        raise ToolboxError(f"{at}: import failed: {type(e).__name__}: {e}") from e


def _python_tool(name: str, fn: Callable[..., Any], at: str) -> _Tool:
    """The JSON schema comes from the signature through a pydantic model, which also
    validates the model's arguments before the call; a parameter takes a description or
    a JSON name other than its own (`from`) with `Annotated[str, Field(...)]`."""
    try:
        model = _arguments_model(name, fn)
        parameters = _untitled(model.model_json_schema(by_alias=True))
    except Exception as e:
        raise ToolboxError(f"{at}: function {name!r} cannot be a tool: {e}") from e
    is_async = inspect.iscoroutinefunction(fn)

    async def call(args: dict[str, Any]) -> str:
        try:
            values = model.model_validate(args)
        except ValidationError as e:
            raise _ToolFailed(f"error: invalid arguments for {name!r}: {_brief(e)}") from None
        kwargs = {field: values.__dict__[field] for field in model.model_fields}
        if is_async:
            return _text(await fn(**kwargs))
        return _text(await _in_thread(fn, kwargs, name))

    return _Tool(schema=_function_schema(name, _description(fn), parameters),
                 source=at, call=call)


def _arguments_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of the keyword arguments, one field per parameter (unknown
    arguments are errors)."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"parameter {p} is not a JSON argument (no *args, **kwargs or "
                            f"positional-only parameters)")
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    with warnings.catch_warnings():  # a parameter named like a BaseModel method is fine here
        warnings.simplefilter("ignore")
        return create_model(f"{name}_arguments",
                            __config__=ConfigDict(extra="forbid", protected_namespaces=()),
                            **fields)


async def _in_thread(fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> Any:
    """A daemon thread per call: at a timeout the call is abandoned and its thread may
    linger until the function returns (Python cannot stop a thread), without holding a
    slot of the pool or blocking the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, fn(**kwargs))
        except Exception as e:
            outcome = (False, e)
        except BaseException as e:  # SystemExit in a tool must not reach the loop
            outcome = (False, RuntimeError(repr(e)))
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the toolbox closed while this call was abandoned
            pass

    threading.Thread(target=work, name=f"tool-{name}", daemon=True).start()
    return await future


# -- shapes ------------------------------------------------------------------------------------

def _description(fn: Callable[..., Any]) -> str:
    """The docstring, its hard-wrapped lines joined: a paragraph is one line."""
    paragraphs = (inspect.getdoc(fn) or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _function_schema(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


def _untitled(schema: Any) -> Any:
    """Without pydantic's generated `title`s (`City`, `get_weatherArguments`): they tell
    the model nothing and cost prompt tokens. Property names are kept, even `title`."""
    if isinstance(schema, list):
        return [_untitled(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(
                value, dict):
            out[key] = {k: _untitled(v) for k, v in value.items()}
        else:
            out[key] = _untitled(value)
    return out


def _arguments(raw: Any, name: str) -> dict[str, Any]:
    """A call's arguments: a JSON object text (an empty text is `{}`)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise _ToolFailed(f"error: arguments of {name!r} are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _ToolFailed(f"error: arguments of {name!r} must be a JSON object, "
                          f"not {type(value).__name__}")
    return value


def _brief(e: ValidationError) -> str:
    """pydantic's errors in one line, e.g. `city: Field required; x: Input should be ...`."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                     for err in e.errors(include_url=False))


def _text(value: Any) -> str:
    """A tool's return value as the tool message: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, ensure_ascii=False, default=str)


def parse_recorded(value: Any) -> dict[str, Any]:
    """A row's recorded results as {call id or tool name: result}: a JSON object text,
    a struct (dict) or a map (list of pairs) of an Arrow column; null is no results.
    Raises ValueError for any other shape (a reader can refuse the row up front)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"recorded results are not valid JSON: {e}") from None
    if isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                       for p in value):
        value = dict(value)
    if not isinstance(value, dict):
        raise ValueError("recorded results must be an object {call id or tool name: result}, "
                         f"not {type(value).__name__}")
    return value


def _recorded_result(recorded: Any, call_id: str, name: str) -> str:
    """The result recorded for the call's id, else for its tool name."""
    try:
        table = parse_recorded(recorded)
    except ValueError as e:
        raise _ToolFailed(f"error: {e}") from None
    for key in (call_id, name):
        if table.get(key) is not None:
            return _text(table[key])
    raise _ToolFailed(f"error: no recorded result for call {call_id!r} of tool {name!r}")
