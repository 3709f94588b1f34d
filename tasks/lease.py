"""One run at a time per output folder: a lease object in the output store.

Two runs on the same output would each resume the same shards and write every row
twice. The lease is created with a create-if-absent write; the winner renews it with
replace-if-unchanged writes while it runs and deletes it at the end. A lease whose
holder stopped renewing (past its TTL), or whose process is gone from this host, is
taken over the same conditional way, so a killed run can be resumed at once on the
same host and after the TTL elsewhere. A holder that finds its lease taken stops
committing: `held` turns false and the committer checks it before each part.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from thinkbatch.tasks.storage import AlreadyExists, Storage, VersionMismatch

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


class RunLease:
    def __init__(self, store: Storage, path: str, ttl_s: float = 60.0):
        self.store = store
        self.path = path
        self.ttl_s = ttl_s
        self.run_id = uuid.uuid4().hex[:12]
        self._version: str | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None and not self._lost.is_set()

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": time.time(),
                           "ttl_s": self.ttl_s}).encode()

    def _stale(self, holder: dict) -> bool:
        if time.time() - holder["renewed_at"] > holder["ttl_s"]:
            return True
        return holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"])

    def acquire(self) -> RunLease:
        try:
            self._version = self.store.write_atomic(self.path, self._body(), if_absent=True)
        except AlreadyExists:
            data, version = self.store.read_versioned(self.path)
            holder = json.loads(data)
            if not self._stale(holder):
                age = time.time() - holder["renewed_at"]
                raise OutputInUse(
                    f"{self.path} is held by run {holder['run_id']} on host {holder['host']} "
                    f"(pid {holder['pid']}), renewed {age:.0f}s ago: another run is writing "
                    f"this output. Wait for it, or for its lease to expire "
                    f"({holder['ttl_s']:.0f}s after its last renewal) if it died.") from None
            try:
                self._version = self.store.write_atomic(self.path, self._body(), if_match=version)
            except VersionMismatch:
                raise OutputInUse(f"{self.path}: another run took this output over "
                                  "at the same moment") from None
            log.info("took over the lease of dead run %s", holder["run_id"])
        return self

    def keep_renewed(self) -> RunLease:
        """Renew in the background (every TTL/4) until release()."""
        self._thread = threading.Thread(target=self._renew_loop, name="thinkbatch-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Extend the lease; False once another run has taken it over."""
        if self._lost.is_set():
            return False
        try:
            self._version = self.store.write_atomic(self.path, self._body(),
                                                    if_match=self._version)
        except VersionMismatch:
            log.error("lease %s was taken over by another run: stopping commits", self.path)
            self._lost.set()
            return False
        except Exception as e:  # transient: the next renewal tries again
            log.warning("lease renewal failed (%s); retrying", e)
        return True

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
