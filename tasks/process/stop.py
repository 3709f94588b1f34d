"""A clean stop on SIGTERM and SIGINT (Prefect's cancellation, Kubernetes' eviction, Ctrl-C).

While shards generate, a signal is only recorded (`StopSignals`): the worker loop sees
it, commits the rows already generated, releases its claims after that last commit and
raises `Stopped`; nothing is interrupted half way (a conditional write, a commit).
Elsewhere (the engine loading, planning) there is nothing to commit, and a signal
raises `Stopped` at once. A second signal always raises at once: whoever sends it does
not want to wait.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The run stopped on a signal, cleanly: what was committed stays, a rerun resumes.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    up takes it for a fault."""

    def __init__(self, signum: int, rows_committed: int = 0):
        super().__init__(signum, rows_committed)
        self.signum = signum
        self.rows_committed = rows_committed

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name}; "
                f"{self.rows_committed} rows committed")


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def raise_on_signals() -> None:
    """For a command's whole life: SIGTERM and SIGINT raise `Stopped` (main thread only)."""
    for sig in SIGNALS:
        signal.signal(sig, _raise)


class StopSignals:
    """While entered (in the main thread; elsewhere it changes nothing), SIGTERM and
    SIGINT are recorded in `signum` instead of interrupting; the previous handlers come
    back on exit. The handler sets a plain attribute only: it may run while the main
    thread holds any lock."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch with nothing to commit (loading the engine): a signal raises at once."""
        if self.signum is not None:
            raise Stopped(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self._interruptible or not first:
            raise Stopped(signum)
