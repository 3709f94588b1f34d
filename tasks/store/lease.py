"""Leases in the output store: who may write what, kept with conditional writes only.

A lease is an object created with create-if-absent, renewed with replace-if-unchanged
and deleted when done. A lease whose holder stopped renewing (past its TTL), or whose
process is gone from this host, is taken over the same conditional way, so work of a
killed holder resumes at once on the same host and after the TTL elsewhere. A holder
that finds its lease taken stops writing (`renew()` is False): the committer renews a
shard's claim right before each part, which fences out a holder that stalled.

Two uses: the run lease (one run per output folder: two runs would both resume the
same shards and write rows twice) and shard claims (workers on several nodes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from thinkbatch.tasks.store.storage import AlreadyExists, Storage, VersionMismatch

log = logging.getLogger("thinkbatch.lease")


class OutputInUse(RuntimeError):
    """Another live run holds this output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, store: Storage, path: str, ttl_s: float = 60.0,
                 owner: str | None = None):
        self.store = store
        self.path = path
        self.ttl_s = ttl_s
        self.owner = owner or uuid.uuid4().hex[:12]
        self.holder: dict[str, Any] | None = None  # the live holder that kept us out
        self._version: str | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        # Renewals come from the background thread and from the committer (fencing):
        # two at once would race on the same version and one would look like a takeover.
        self._renewing = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None and not self._lost.is_set()

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": time.time(),
                           "ttl_s": self.ttl_s}).encode()

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if time.time() - holder["renewed_at"] > holder["ttl_s"]:
            return True
        return holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"])

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; False if a live holder keeps it."""
        try:
            self._version = self.store.write_atomic(self.path, self._body(), if_absent=True)
            return True
        except AlreadyExists:
            pass
        try:
            data, version = self.store.read_versioned(self.path)
        except FileNotFoundError:  # released in between: try once more from scratch
            return self.try_acquire()
        holder = json.loads(data)
        if not self._stale(holder):
            self.holder = holder
            return False
        try:
            self._version = self.store.write_atomic(self.path, self._body(), if_match=version)
        except VersionMismatch:  # another taker was faster
            self.holder = holder
            return False
        log.info("took over %s from %s (pid %s, renewed %.0fs ago)", self.path,
                 holder["owner"], holder["pid"], time.time() - holder["renewed_at"])
        return True

    def renew(self) -> bool:
        """Extend the lease; False once another holder has taken it over."""
        with self._renewing:
            if not self.held:
                return False
            try:
                self._version = self.store.write_atomic(self.path, self._body(),
                                                        if_match=self._version)
            except VersionMismatch:
                log.error("%s was taken over by another holder: stopping writes", self.path)
                self._lost.set()
                return False
            except Exception as e:  # transient: still ours until the TTL says otherwise
                log.warning("renewing %s failed (%s); retrying", self.path, e)
            return True

    def keep_renewed(self) -> Lease:
        """Renew in the background (every TTL/4) until release()."""
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"thinkbatch-lease-{self.path.rsplit('/', 1)[-1]}")
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and self.renew():
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            self.store.delete(self.path)
        self._version = None


def acquire_run_lease(store: Storage, path: str, ttl_s: float = 60.0) -> Lease:
    """The output folder's run lease, renewed until released; OutputInUse if taken."""
    lease = Lease(store, path, ttl_s)
    if not lease.try_acquire():
        raise _in_use(path, lease.holder or {}, ttl_s)
    return lease.keep_renewed()


def refuse_if_held(store: Storage, path: str, ttl_s: float = 60.0) -> None:
    """OutputInUse now if a live run holds the lease: a look, not a claim (the run still
    takes the lease itself), so a command can refuse before it starts anything."""
    try:
        holder = json.loads(store.read_bytes(path))
    except FileNotFoundError:
        return
    if not Lease._stale(holder):
        raise _in_use(path, holder, ttl_s)


def _in_use(path: str, h: dict[str, Any], ttl_s: float) -> OutputInUse:
    age = time.time() - h.get("renewed_at", time.time())
    return OutputInUse(
        f"{path} is held by run {h.get('owner')} on host {h.get('host')} "
        f"(pid {h.get('pid')}), renewed {age:.0f}s ago: another run is writing this "
        f"output. Wait for it, or for its lease to expire ({h.get('ttl_s', ttl_s):.0f}s "
        "after its last renewal) if it died.")
