"""Python tools in worker processes (`python: tools.py` with `isolated: true`): a call runs
in a process of the source's own, which a timeout (or the toolbox's close) kills, so a
tool that hangs or leaks holds nothing past its timeout: not a thread, not a slot.

Workers are started on demand (at most one per call running, so at most
`max_concurrent_tools`), reused while they answer, and killed when a call is abandoned.
Each imports the module itself and checks the arguments again; only JSON crosses the
pipe (one line each way), and the tool's own prints go to stderr, not into the replies.
A worker ends when its stdin closes, and on Linux it is killed with thinkbatch (a parent
death signal), so none outlives a killed thinkbatch, in a call that hangs either. The module is
imported in thinkbatch's process too (its schemas come from there), so its top-level
code runs there as well; isolation is for the calls.

Run as `python -m thinkbatch.tasks.tools.isolated SOURCE_JSON BASE_DIR AT PARENT_PID`: the
worker.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from thinkbatch.schemas.rollout import ToolSource
from thinkbatch.tasks.tools.tool import ToolFailed, as_text

LINE_LIMIT = 1 << 30  # a reply is one JSON line; asyncio's default limit is 64 KiB
CLOSE_TIMEOUT_S = 5.0  # a killed worker is reaped within this (it takes milliseconds)


class Processes:
    """The idle workers of one source, and all of them to kill at close."""

    def __init__(self, source: ToolSource, base_dir: Path, at: str):
        self._argv = [sys.executable, "-m", "thinkbatch.tasks.tools.isolated",
                      source.model_dump_json(), str(base_dir), at, str(os.getpid())]
        self._idle: list[asyncio.subprocess.Process] = []
        self._all: set[asyncio.subprocess.Process] = set()
        self._closed = False

    async def call(self, name: str, args: dict[str, Any]) -> str:
        worker = await self._take()
        try:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(json.dumps({"name": name, "args": args}).encode() + b"\n")
            await worker.stdin.drain()
            line = await worker.stdout.readline()
        except BaseException:  # timed out, cancelled at close, or the pipe broke
            await self._end(worker)
            raise
        if not line:
            code = await self._end(worker)
            raise ToolFailed(f"error: tool {name!r} failed: its process exited with code {code}")
        if self._closed:
            await self._end(worker)
        else:
            self._idle.append(worker)
        reply = json.loads(line)
        if "error" in reply:
            raise ToolFailed(reply["error"])
        return reply["text"]

    async def close(self) -> None:
        """Kill every worker (a call still running ends with its cancellation)."""
        self._closed = True
        await asyncio.gather(*(self._end(w) for w in list(self._all)))

    async def _take(self) -> asyncio.subprocess.Process:
        while self._idle:
            worker = self._idle.pop()
            if worker.returncode is None:
                return worker
            self._all.discard(worker)
        worker = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT)
        self._all.add(worker)
        return worker

    async def _end(self, worker: asyncio.subprocess.Process) -> int | None:
        """Kill the worker and reap it here, reading its stdout to the end, so that its
        pipes close on the loop (a task doing it could be cancelled by the toolbox's
        close, and the pipes left to a closed loop). Its exit code; None if it would
        not end within CLOSE_TIMEOUT_S."""
        self._all.discard(worker)
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.close()
        if worker.returncode is None:
            try:
                worker.kill()
            except ProcessLookupError:
                pass
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await worker.stdout.read()
                return await worker.wait()
        except TimeoutError:
            return None


def _serve(source: ToolSource, base_dir: Path, at: str, parent: int) -> None:
    """The worker: answer one JSON line per request line until stdin closes."""
    from thinkbatch.tasks.tools.functions import arguments_model, defined_functions, validated

    _die_with_parent(parent)
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the tool's prints go to stderr, not into the replies
    functions = defined_functions(source, base_dir, at)
    models = {name: arguments_model(name, fn) for name, fn in functions.items()}
    for line in sys.stdin:
        request = json.loads(line)
        name = request["name"]
        try:
            kwargs = validated(models[name], request["args"], name)
            value = functions[name](**kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
            reply = {"text": as_text(value)}
        except ToolFailed as e:
            reply = {"error": str(e)}
        except Exception as e:
            reply = {"error": f"error: tool {name!r} failed: {type(e).__name__}: {e}"}
        replies.write(json.dumps(reply, ensure_ascii=False) + "\n")
        replies.flush()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when the thread that started it (the toolbox's) ends;
    if thinkbatch (`parent`) is gone already, end now."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: stdin's end still stops an idle worker
        return
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


if __name__ == "__main__":
    _serve(ToolSource.model_validate_json(sys.argv[1]), Path(sys.argv[2]), sys.argv[3],
           int(sys.argv[4]))
