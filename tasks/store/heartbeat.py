"""A scale-out worker's heartbeat: a small record in the output store, rewritten every
few seconds from the worker's start (while its engine loads for 10-20 minutes too), from
which the parent tells a worker still at work from one that is gone.

Prefect's states cannot tell: a SIGKILLed worker never reports an end, and one that loads
a model for 15 minutes looks like one that hangs. The record's age is the store's
(Storage.read_with_age), as a lease's is, so clock skew between hosts does not count.
It says how many shards the worker claimed: one that never claimed holds its node (8
GPUs) for nothing once no shard is left, and the parent cancels it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

from thinkbatch.tasks.store.storage import Storage

log = logging.getLogger("thinkbatch.heartbeat")

BEATS_PER_TIMEOUT = 5  # a worker writes its record this many times per timeout


class Heartbeat:
    """Rewrites the worker's record every `timeout_s / BEATS_PER_TIMEOUT` until stopped."""

    def __init__(self, store: Storage, path: str, timeout_s: float):
        self.store = store
        self.path = path
        self.every_s = timeout_s / BEATS_PER_TIMEOUT
        self.claimed = 0  # shards claimed so far (the worker loop's thread)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="thinkbatch-heartbeat",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """The beats stop; the record stays (the parent removes it once the run ended):
        a record gone would read as a worker that never started."""
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def _write(self) -> None:
        record = {"claimed": self.claimed, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self.store.write_atomic(self.path, json.dumps(record).encode())
        except Exception as e:  # transient: the next beat tries again, the timeout allows it
            log.warning("heartbeat %s not written: %s: %s", self.path, type(e).__name__, e)


def read(store: Storage, path: str) -> tuple[dict, float] | None:
    """The worker's record and its age in seconds by the store's clock; None if absent."""
    try:
        data, _, age_s = store.read_with_age(path)
    except FileNotFoundError:
        return None
    return json.loads(data), age_s


def verdict(beat: tuple[dict, float] | None, running_s: float | None, all_done: bool,
            timeout_s: float) -> tuple[str, str] | None:
    """What the parent does with a worker run that has not ended: ("cancel" | "crash",
    why), or None to wait. `running_s`: how long Prefect has shown it Running (None while
    its infrastructure starts: an image pull is no sign of death)."""
    if beat is not None and beat[1] > timeout_s:
        return "crash", (f"no heartbeat for {beat[1]:.0f} s (scale.heartbeat_timeout_s "
                         f"{timeout_s:g}): presumed dead")
    if all_done and (beat is None or not beat[0].get("claimed")):
        return "cancel", "every shard is done and this worker never claimed one"
    if beat is None and running_s is not None and running_s > timeout_s:
        return "crash", (f"running for {running_s:.0f} s without a heartbeat "
                         f"(scale.heartbeat_timeout_s {timeout_s:g}): presumed dead")
    return None
