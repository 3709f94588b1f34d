"""`rollout.max_concurrent_tools` as the toolbox enforces it: a slot is held while a call's
work runs, not while its caller waits. A Python tool runs in a thread, which Python cannot
stop: a call abandoned at its timeout keeps its slot until its thread ends, so the cap
bounds the threads really running, and a tool that hangs forever costs one slot, never
one more thread per call.

When every slot is held by such abandoned calls, a call waiting for one could wait
forever: it fails at once instead, with an error the model reads (and the run goes on
with the tools that still answer, e.g. MCP ones once a thread ends). Everything here runs
on the toolbox's event loop; only `Slot.hold`'s release is called from a tool's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from thinkbatch.tasks.tools.tool import ToolFailed


class Slots:
    def __init__(self, cap: int):
        self.cap = cap
        self.busy = 0  # slots held: calls running, and abandoned calls whose work goes on
        self.abandoned = 0  # of those, calls past their timeout whose thread still runs
        self._waiters: list[asyncio.Future[None]] = []

    async def take(self, name: str) -> Slot:
        while self.busy >= self.cap:
            if self.abandoned >= self.cap:
                raise ToolFailed(
                    f"error: tool {name!r} was not run: all {self.cap} tool slots "
                    "(rollout.max_concurrent_tools) are held by calls that timed out and "
                    "still run")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.busy += 1
        return Slot(self)

    def _changed(self) -> None:
        """Every waiter looks again (a slot freed, or the last one abandoned)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Slot:
    """One call's slot. The toolbox ends the call (`call_over`); a tool whose work can
    outlive its call (a thread) `hold`s the slot until the work ends."""

    def __init__(self, slots: Slots):
        self._slots = slots
        self._held = False  # the work releases the slot, when it ends
        self._work_over = False
        self._call_over = False

    def hold(self) -> Callable[[], None]:
        """The slot stays taken until the returned callable is called (from any
        thread, once the work ended), even past the call's end."""
        self._held = True
        loop = asyncio.get_running_loop()

        def release() -> None:
            try:
                loop.call_soon_threadsafe(self._end_work)
            except RuntimeError:  # the toolbox closed (its loop with it): nothing to free
                pass

        return release

    def call_over(self) -> None:
        """The call returned, failed or timed out."""
        self._call_over = True
        if self._held and not self._work_over:
            self._slots.abandoned += 1
        else:
            self._free()
        self._slots._changed()

    def _end_work(self) -> None:
        self._work_over = True
        if self._call_over:
            self._slots.abandoned -= 1
            self._free()
            self._slots._changed()

    def _free(self) -> None:
        self._slots.busy -= 1
