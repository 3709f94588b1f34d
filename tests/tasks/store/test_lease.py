from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from thinkbatch.tasks.store.lease import Lease, OutputInUse, acquire_run_lease, process_identity
from thinkbatch.tasks.store.storage import Storage


@pytest.fixture(params=["local", "s3"])
def lease_path(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "_lease.json")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket(f'lease-{tmp_path.name.lower()[-20:]}')}/out/_lease.json"


def _past_ttl(path: str, ttl_s: float) -> None:
    """Sleep until a lease written now is stale by the store's clock: S3's stamps are
    whole seconds, so its age is taken a second short and can lag up to two."""
    time.sleep(ttl_s + (2.1 if path.startswith("s3://") else 0.1))


def dead_pid() -> int:
    """The pid of a process of this namespace that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def holder_record(**identity: Any) -> bytes:
    """A lease as another process wrote it: this process's identity unless overridden."""
    return json.dumps({"owner": "other", **process_identity(), "renewed_at": time.time(),
                       "ttl_s": 600, **identity}).encode()


def test_second_run_is_refused_while_the_first_lives(lease_path: str) -> None:
    store = Storage()
    first = acquire_run_lease(store, lease_path)
    with pytest.raises(OutputInUse, match=f"held by run {first.owner}"):
        acquire_run_lease(store, lease_path)
    first.release()
    assert not store.exists(lease_path)
    acquire_run_lease(store, lease_path).release()


def test_lease_of_a_dead_process_is_taken_over(lease_path: str) -> None:
    store = Storage()
    store.write_atomic(lease_path, holder_record(owner="dead", pid=dead_pid()))
    lease = Lease(store, lease_path)
    assert lease.try_acquire() and lease.held
    lease.release()


BOOTTIME_S = time.clock_gettime(time.CLOCK_BOOTTIME)


@pytest.mark.parametrize("identity, written_s_ago, taken", [
    pytest.param(lambda: {"pid_ns": "pid:[1]", "pid": dead_pid()}, 0, False,
                 id="another pid namespace, its pid not ours: a container's live holder"),
    pytest.param(lambda: {"pid": dead_pid()}, 0, True, id="this namespace, process gone"),
    pytest.param(lambda: {"started": process_identity()["started"] - 1}, 0, True,
                 id="this namespace, its pid now another process's"),
    pytest.param(lambda: {"boot_id": "another-boot"}, BOOTTIME_S + 60, True,
                 id="this host before its last boot"),
    pytest.param(lambda: {"boot_id": "another-boot"}, 0, False,
                 id="a same-named host that renews"),
])
def test_a_holder_is_gone_only_if_this_machine_can_tell(tmp_path: Path, identity: Any,
                                                        written_s_ago: float, taken: bool) -> None:
    """Within its TTL a lease is taken only when its process has certainly ended: same
    boot and pid namespace and no process with its pid and start time, or written on
    this host before it booted. The hostname alone would take a live container's."""
    path, store = str(tmp_path / "_lease.json"), Storage()
    store.write_atomic(path, holder_record(**identity()))
    if written_s_ago:
        stamp = time.time() - written_s_ago
        os.utime(path, (stamp, stamp))
    lease = Lease(store, path)
    assert lease.try_acquire() is taken
    assert json.loads(store.read_bytes(path))["owner"] == (lease.owner if taken else "other")


NS_HOLDER = """
import json, sys
from thinkbatch.tasks.store.lease import Lease, process_identity
from thinkbatch.tasks.store.storage import Storage

lease = Lease(Storage(), sys.argv[1], ttl_s=600)
assert lease.try_acquire()
print(json.dumps(process_identity()), flush=True)
sys.stdin.readline()
lease.release()
"""


def test_a_live_holder_in_another_pid_namespace_keeps_its_lease(tmp_path: Path) -> None:
    """A container with host networking: same hostname, same kernel, its own pids. The
    holder runs in a new pid namespace with a pid that no process has here."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("making a pid namespace needs root (unshare --pid)")
    path = str(tmp_path / "_lease.json")
    pid = next(p for p in itertools.count(2) if not os.path.exists(f"/proc/{p}"))
    spend = f'i=2; while [ $i -lt {pid} ]; do /bin/true; i=$((i+1)); done; "$0" -c "$1" "$2"'
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                               "sh", "-c", spend, sys.executable, NS_HOLDER, path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        record = json.loads(holder.stdout.readline())
        me = process_identity()
        assert [record[k] for k in ("host", "boot_id", "pid")] == [me["host"], me["boot_id"], pid]
        assert record["pid_ns"] != me["pid_ns"] and not os.path.exists(f"/proc/{pid}")
        taker = Lease(Storage(), path)
        assert not taker.try_acquire() and taker.holder["pid"] == pid
        holder.communicate("go\n", timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == 0 and not os.path.exists(path)


class SkewedLease(Lease):
    """A holder whose clock is `skew_s` off: its records say so."""

    def __init__(self, *args: Any, skew_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skew_s = skew_s

    def _body(self) -> bytes:
        record = json.loads(super()._body())
        return json.dumps({**record, "renewed_at": record["renewed_at"] + self.skew_s}).encode()


def test_a_holder_whose_clock_is_hours_off_is_judged_by_the_stores_clock(lease_path: str) -> None:
    """One holder 3 h behind, one 3 h ahead: neither is taken while it renews, both are
    taken about a TTL after they stop (S3: its stamps are whole seconds)."""
    ttl, slack = (2.0, 3.0) if lease_path.startswith("s3://") else (1.5, 1.0)
    store = Storage()
    paths = [lease_path.replace(".json", f"-{name}.json") for name in ("behind", "ahead")]
    holders = [SkewedLease(store, p, ttl_s=ttl, skew_s=skew)
               for p, skew in zip(paths, (-3 * 3600, 3 * 3600))]
    assert all(h.try_acquire() for h in holders)
    renewing_until = time.monotonic() + ttl + 0.5
    while time.monotonic() < renewing_until:
        last_renewal = time.monotonic()
        for holder, path in zip(holders, paths):
            assert holder.renew()
            assert not Lease(store, path, ttl_s=ttl).try_acquire()
        time.sleep(ttl / 4)
    taken_after: dict[str, float] = {}
    while len(taken_after) < 2 and time.monotonic() < last_renewal + ttl + slack + 1:
        for p in paths:
            if p not in taken_after and Lease(store, p, ttl_s=ttl).try_acquire():
                taken_after[p] = time.monotonic() - last_renewal
        time.sleep(0.05)
    assert sorted(taken_after) == sorted(paths)
    assert all(ttl - 0.05 <= t <= ttl + slack for t in taken_after.values()), taken_after
    assert not any(h.renew() for h in holders)  # and each stopped holder learns it lost


def test_expired_lease_is_taken_over_and_the_stalled_holder_is_fenced(lease_path: str) -> None:
    store = Storage()
    stalled = Lease(store, lease_path, ttl_s=0.3)
    assert stalled.try_acquire()  # and then never renews: it stalled
    _past_ttl(lease_path, 0.3)
    new = Lease(store, lease_path)
    assert new.try_acquire()
    assert stalled.held  # it does not know yet
    assert not stalled.renew()  # it wakes up, tries to renew, and learns it lost
    assert not stalled.held and new.held
    stalled.release()
    assert store.exists(lease_path)  # the loser does not delete the winner's lease
    new.release()


def test_concurrent_renewals_by_the_holder_never_look_like_a_takeover(lease_path: str) -> None:
    """The background renewal and the committer's fencing renewal run at the same time."""
    import threading

    lease = Lease(Storage(), lease_path)
    assert lease.try_acquire()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.extend(lease.renew() for _ in range(15)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results) and len(results) == 60 and lease.held
    lease.release()
