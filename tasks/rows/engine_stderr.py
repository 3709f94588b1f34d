"""The engine processes' stderr, passed through to ours with its last lines kept.

When vLLM's engine core dies of an exception, the cause is only in the tracebacks its
processes print to stderr: the client hears `EngineCore encountered an issue. See stack
trace (above) for the root cause.` and nothing else. So while the engine starts, fd 2 is
a pipe: the engine core and its workers inherit it (spawned processes keep the fds 0-2 of
their parent), and a thread copies what comes through to where our stderr went, keeping
the last lines, from which `cause` reads the first exception a traceback ended with.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

KEEP_LINES = 4000  # a few tracebacks of a TP8 engine, from every rank
QUIET_S = 0.3  # a dying engine's last lines are in once the pipe was quiet this long
SETTLE_S = 5.0  # the longest `cause` waits for them
_TRACEBACK = "Traceback (most recent call last):"
# How vLLM's engine core re-raises a worker's exception (multiproc_executor)
_WRAPPED = re.compile(r"Worker failed with error '(.*)', please check the stack trace above")


class EngineStderr:
    def __init__(self) -> None:
        self._lines: deque[tuple[float, str]] = deque(maxlen=KEEP_LINES)
        self._last = time.monotonic()  # when a byte last came through
        self._out = -1
        self._eof = threading.Event()

    @contextmanager
    def inherited(self) -> Iterator[None]:
        """Processes started inside inherit the pipe as their stderr (ours goes through
        it meanwhile, and comes out where it went before)."""
        read, write = os.pipe()
        self._out = os.dup(2)
        threading.Thread(target=self._copy, args=(read,), name="thinkbatch-engine-stderr",
                         daemon=True).start()
        os.dup2(write, 2)
        os.close(write)
        try:
            yield
        finally:
            os.dup2(self._out, 2)  # our last copy of the write end goes: EOF once they exit

    def _copy(self, read: int) -> None:
        partial = b""
        try:
            while chunk := os.read(read, 65536):
                self._last = time.monotonic()
                try:
                    os.write(self._out, chunk)
                except OSError:
                    pass  # where our stderr went is gone; keep the lines all the same
                *lines, partial = (partial + chunk).split(b"\n")
                now = time.monotonic()
                self._lines.extend((now, line.decode(errors="replace").rstrip("\r"))
                                   for line in lines)
        finally:
            os.close(read)
            os.close(self._out)
            self._eof.set()

    def cause(self, since: float) -> str | None:
        """The first exception a traceback printed after `since` (time.monotonic) ended
        with, as `Type: message`: the root cause, which vLLM's engine core repeats
        afterwards wrapped ("Worker failed with error '...'"). Waits for the dying
        processes' last lines first."""
        deadline = time.monotonic() + SETTLE_S
        while not self._eof.is_set() and time.monotonic() < deadline \
                and time.monotonic() - self._last < QUIET_S:
            time.sleep(0.05)
        kept = list(self._lines)
        found = first_exception([line for at, line in kept if at >= since])
        return found and unwrapped(found, [line for _, line in kept])


def unwrapped(found: str, lines: list[str]) -> str:
    """The worker's own exception where `found` is the engine core's wrapping of it. Its
    traceback can precede `since`: with the engine core a step ahead of its client, a
    step that was done before the worker failed can come back after the worker printed."""
    wrapped = _WRAPPED.search(found)
    if wrapped is None:
        return found
    own = [e for e in _exceptions(lines)
           if e.endswith(f": {wrapped.group(1)}") and not _WRAPPED.search(e)]
    return own[-1] if own else found


def first_exception(lines: list[str]) -> str | None:
    """The line that ends the first traceback in `lines`."""
    return next(_exceptions(lines), None)


def _exceptions(lines: list[str]) -> Iterator[str]:
    """The line that ends each traceback in `lines`: the first line after
    `Traceback (most recent call last):` that is not indented (its frames are). A prefix
    before the header (a process tag some logging set-ups add) is stripped from the
    lines that follow."""
    prefix = None
    for line in lines:
        if prefix is None:
            if line.endswith(_TRACEBACK):
                prefix = line[:-len(_TRACEBACK)]
            continue
        body = line.removeprefix(prefix)
        if body and not body[0].isspace():
            yield body.strip()
            prefix = None
