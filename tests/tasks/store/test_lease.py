from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkbatch.tasks.store.lease import Lease, OutputInUse, acquire_run_lease
from thinkbatch.tasks.store.storage import Storage


@pytest.fixture(params=["local", "s3"])
def lease_path(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "_lease.json")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket(f'lease-{tmp_path.name.lower()[-20:]}')}/out/_lease.json"


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
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    store.write_atomic(lease_path, json.dumps({
        "owner": "dead", "host": socket.gethostname(), "pid": int(dead),
        "renewed_at": time.time(), "ttl_s": 600}).encode())
    lease = Lease(store, lease_path)
    assert lease.try_acquire() and lease.held
    lease.release()


def test_expired_lease_is_taken_over_and_the_stalled_holder_is_fenced(lease_path: str) -> None:
    store = Storage()
    stalled = Lease(store, lease_path, ttl_s=0.3)
    assert stalled.try_acquire()  # and then never renews: it stalled
    time.sleep(0.4)
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
