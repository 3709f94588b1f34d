"""Leases in the output store: who may write what, kept with conditional writes only.

A lease is an object created with create-if-absent, renewed with replace-if-unchanged
and deleted when done. A stale lease is taken over the same conditional way. A holder
that finds its lease taken stops writing (`renew()` is False): the committer renews a
shard's claim right before each part, which fences out a holder that stalled.

Stale means one of two things, neither of which puts the holder's clock against the
reader's (hosts' clocks may be hours apart):
- not renewed for its TTL, counted from the object's last write on the store's own clock
  (S3: LastModified against the response's Date; local: mtime against this machine's
  clock). The GET that reads the holder brings both stamps: no request more per look.
- its process is certainly gone, so a killed run's work resumes at once instead of after
  the TTL: the record names the kernel boot, the pid namespace, the pid and the process's
  start time, and the holder is gone if it ran in this boot and this pid namespace and
  no process has that pid and start time (pids are reused), or if it ran on this host
  before its last boot. The hostname alone says nothing: containers with host networking
  share it but not their pids, and another container's live holder would look dead.
  Without /proc (not Linux) only the TTL applies.

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

BOOT_ID = "/proc/sys/kernel/random/boot_id"


class OutputInUse(RuntimeError):
    """Another live run holds this output folder."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat, field 22);
    None if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    return None if stat is None else int(stat.rsplit(")", 1)[1].split()[19])


def process_identity() -> dict[str, Any]:
    """This process as a lease records it: enough for another process to tell for sure
    that it is gone (see the module's docstring)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _read(BOOT_ID), "pid_ns": pid_ns,
            "pid": pid, "started": _start_time(pid)}


def _gone(holder: dict[str, Any], age_s: float) -> bool:
    """The holder's process has certainly ended. `age_s`: since its last renewal."""
    me = process_identity()
    if me["boot_id"] is None or me["pid_ns"] is None:
        return False
    if holder.get("boot_id") == me["boot_id"]:
        return (holder.get("pid_ns") == me["pid_ns"] and holder.get("started") is not None
                and _start_time(holder["pid"]) != holder["started"])
    # Another boot: on this host, and written before this boot (a live holder on a
    # same-named host elsewhere renews within its TTL: younger than this machine's uptime).
    return holder.get("host") == me["host"] and age_s > time.clock_gettime(time.CLOCK_BOOTTIME)


def _stale(holder: dict[str, Any], age_s: float) -> bool:
    return age_s > holder["ttl_s"] or _gone(holder, age_s)


class Lease:
    def __init__(self, store: Storage, path: str, ttl_s: float = 60.0,
                 owner: str | None = None):
        self.store = store
        self.path = path
        self.ttl_s = ttl_s
        self.owner = owner or uuid.uuid4().hex[:12]
        self.holder: dict[str, Any] | None = None  # the live holder that kept us out
        self.holder_age_s = 0.0  # since its last renewal, by the store's clock
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
        """The holder's record; `renewed_at` (this host's clock) is for people only."""
        return json.dumps({"owner": self.owner, **process_identity(),
                           "renewed_at": time.time(), "ttl_s": self.ttl_s}).encode()

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; False if a live holder keeps it."""
        try:
            self._version = self.store.write_atomic(self.path, self._body(), if_absent=True)
            return True
        except AlreadyExists:
            pass
        try:
            data, version, age_s = self.store.read_with_age(self.path)
        except FileNotFoundError:  # released in between: try once more from scratch
            return self.try_acquire()
        holder = json.loads(data)
        if not _stale(holder, age_s):
            self.holder, self.holder_age_s = holder, age_s
            return False
        try:
            self._version = self.store.write_atomic(self.path, self._body(), if_match=version)
        except VersionMismatch:  # another taker was faster
            self.holder, self.holder_age_s = holder, age_s
            return False
        log.info("took over %s from %s (pid %s on %s, renewed %.0fs ago)", self.path,
                 holder["owner"], holder["pid"], holder["host"], age_s)
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
        raise _in_use(path, lease.holder or {}, lease.holder_age_s, ttl_s)
    return lease.keep_renewed()


def refuse_if_held(store: Storage, path: str, ttl_s: float = 60.0) -> None:
    """OutputInUse now if a live run holds the lease: a look, not a claim (the run still
    takes the lease itself), so a command can refuse before it starts anything."""
    try:
        data, _, age_s = store.read_with_age(path)
    except FileNotFoundError:
        return
    holder = json.loads(data)
    if not _stale(holder, age_s):
        raise _in_use(path, holder, age_s, ttl_s)


def _in_use(path: str, h: dict[str, Any], age_s: float, ttl_s: float) -> OutputInUse:
    return OutputInUse(
        f"{path} is held by run {h.get('owner')} on host {h.get('host')} "
        f"(pid {h.get('pid')}), renewed {max(age_s, 0):.0f}s ago: another run is writing this "
        f"output. Wait for it, or for its lease to expire ({h.get('ttl_s', ttl_s):.0f}s "
        "after its last renewal) if it died.")
