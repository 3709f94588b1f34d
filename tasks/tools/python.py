"""Python tools: each public function a module defines is a tool, its JSON schema from its
signature (through a pydantic model that also checks the model's arguments before the
call), its description from its docstring.

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
import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from thinkbatch.schemas.rollout import ToolSource
from thinkbatch.tasks.tools.slots import Slot
from thinkbatch.tasks.tools.tool import (Tool, ToolboxError, ToolFailed, as_text,
                                         function_schema, untitled)

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


def defined_functions(source: ToolSource, base_dir: Path, at: str) -> dict[str, Callable[..., Any]]:
    """The source's tools by name: its public functions (or those of `functions`)."""
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
    return {name: defined[name] for name in source.functions or defined}


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

    return Tool(schema=function_schema(name, _description(fn), parameters), source=at,
                call=call, close=processes.close if processes is not None else None)


def validated(model: type[BaseModel], args: dict[str, Any], name: str) -> dict[str, Any]:
    """The function's keyword arguments, checked by its model."""
    try:
        values = model.model_validate(args)
    except ValidationError as e:
        raise ToolFailed(f"error: invalid arguments for {name!r}: {_brief(e)}") from None
    return {field: values.__dict__[field] for field in model.model_fields}


def arguments_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
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


def _description(fn: Callable[..., Any]) -> str:
    """The docstring, its hard-wrapped lines joined: a paragraph is one line."""
    paragraphs = (inspect.getdoc(fn) or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _brief(e: ValidationError) -> str:
    """pydantic's errors in one line, e.g. `city: Field required; x: Input should be ...`."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                     for err in e.errors(include_url=False))
