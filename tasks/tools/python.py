"""Python tools: each public function a module defines is a tool, its JSON schema from its
signature (through a pydantic model that also checks the model's arguments before the
call), its description from its docstring (tools/functions.py).

Every call runs in a daemon thread of its own, an `async def` one on an event loop of its
own in that thread: a tool that blocks (a `time.sleep`, a synchronous HTTP client inside an
`async def`) then stalls neither the toolbox's loop, where the timeouts and the MCP
sessions run, nor any other call. At its timeout a call is abandoned (an async one is
cancelled first); Python cannot stop a thread, so one still running keeps its slot
(tools/slots.py) until it ends: the concurrency cap bounds the threads, and none blocks
the process's exit. Threads rather than a process per tool: a tool keeps its module's
state and its arguments and results need no pickling, at the cost that one that never
returns holds its slot for good (the run goes on with the others). An async tool gets a
new event loop per call, so it must not keep loop-bound objects (a client session) across
calls."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkbatch.schemas.rollout import ToolSource
from thinkbatch.tasks.tools.functions import (arguments_model, defined_functions, description,
                                              validated)
from thinkbatch.tasks.tools.slots import Slot
from thinkbatch.tasks.tools.tool import Tool, ToolboxError, as_text, function_schema, untitled

if TYPE_CHECKING:
    from thinkbatch.tasks.tools.isolated import Processes

CANCEL_GRACE_S = 0.2  # a cancelled async tool that has not ended by then keeps its slot


def python_tools(source: ToolSource, base_dir: Path, at: str) -> list[Tool]:
    """Each public function defined in the module (not imported into it), or those of
    `functions`, in the order written; with `isolated`, each call runs in a worker
    process (tools/isolated.py)."""
    from thinkbatch.tasks.tools.isolated import Processes

    functions = defined_functions(source, base_dir, at)
    processes = Processes(source, base_dir, at) if source.isolated else None
    return [_python_tool(name, fn, at, processes) for name, fn in functions.items()]






def _python_tool(name: str, fn: Callable[..., Any], at: str,
                 processes: Processes | None) -> Tool:
    """The JSON schema comes from the signature through a pydantic model, which also
    validates the model's arguments before the call; a parameter takes a description or
    a JSON name other than its own (`from`) with `Annotated[str, Field(...)]`."""
    try:
        model = arguments_model(name, fn)
        parameters = untitled(model.model_json_schema(by_alias=True))
    except Exception as e:
        raise ToolboxError(f"{at}: function {name!r} cannot be a tool: {e}") from e
    is_async = inspect.iscoroutinefunction(fn)

    async def call(args: dict[str, Any], slot: Slot) -> str:
        kwargs = validated(model, args, name)
        if processes is not None:
            return await processes.call(name, args)
        return as_text(await _in_thread(fn, kwargs, name, slot, is_async))

    return Tool(schema=function_schema(name, description(fn), parameters), source=at,
                call=call, close=processes.close if processes is not None else None)






async def _in_thread(fn: Callable[..., Any], kwargs: dict[str, Any], name: str, slot: Slot,
                     is_async: bool) -> Any:
    """The call in a daemon thread that holds `slot` until the function returns; an
    async function runs there on a loop of its own, and is cancelled when the call is
    (at its timeout, or when the toolbox closes)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    ended: asyncio.Future[None] = loop.create_future()
    release = slot.hold()
    own_loop = asyncio.new_event_loop() if is_async else None
    task = own_loop.create_task(fn(**kwargs)) if own_loop is not None else None

    def settle(ok: bool, value: Any) -> None:
        if not ended.done():
            ended.set_result(None)
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            if own_loop is not None and task is not None:
                asyncio.set_event_loop(own_loop)
                outcome = (True, own_loop.run_until_complete(task))
            else:
                outcome = (True, fn(**kwargs))
        except Exception as e:
            outcome = (False, e)
        except BaseException as e:  # SystemExit in a tool must not reach the loop
            outcome = (False, RuntimeError(repr(e)))
        finally:
            if own_loop is not None:
                own_loop.run_until_complete(own_loop.shutdown_asyncgens())
                own_loop.close()
            release()
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the toolbox closed while this call was abandoned
            pass

    threading.Thread(target=work, name=f"tool-{name}", daemon=True).start()
    try:
        return await future
    except asyncio.CancelledError:
        if own_loop is not None and task is not None:
            try:
                own_loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # it has just ended
                pass
            # A cancelled coroutine ends at once unless it blocks: then its slot is free.
            await asyncio.wait([ended], timeout=CANCEL_GRACE_S)
        raise
