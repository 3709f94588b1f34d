"""Storage behaves the same on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkbatch.schemas.job import StorageSpec
from thinkbatch.tasks.store.storage import AlreadyExists, Storage, StorageError, VersionMismatch

_names = itertools.count()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path)
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.bucket(f'store-{next(_names)}')}/prefix"


def test_conditional_writes_let_one_writer_win(root: str) -> None:
    store = Storage()
    path = f"{root}/x.json"
    v1 = store.write_atomic(path, b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.write_atomic(path, b"second", if_absent=True)
    v2 = store.write_atomic(path, b"third", if_match=v1)
    with pytest.raises(VersionMismatch):
        store.write_atomic(path, b"fourth", if_match=v1)
    assert store.read_versioned(path) == (b"third", v2)
    assert store.list_files(root) == ["x.json"]  # no temporaries left behind


def test_parquet_round_trip_and_listing(root: str) -> None:
    store = Storage()
    sink = io.BytesIO()
    pq.write_table(pa.table({"a": list(range(100)), "b": ["x"] * 100}), sink, row_group_size=10)
    for name in ("d/1.parquet", "d/2.parquet", "d/_hidden.parquet", "d/sub/3.parquet"):
        store.write_atomic(f"{root}/{name}", sink.getvalue())
    files = store.list_inputs(f"{root}/d")
    assert [f.path for f in files] == [f"{root}/d/1.parquet", f"{root}/d/2.parquet",
                                       f"{root}/d/sub/3.parquet"]
    assert [f.path for f in store.list_inputs(f"{root}/d/*.parquet")][:2] == [
        f"{root}/d/1.parquet", f"{root}/d/2.parquet"]
    assert store.open_parquet(files[0].path).metadata.num_row_groups == 10
    assert store.read_columns(files[0].path, ["a"]).column(0).to_pylist() == list(range(100))
    assert store.list_files(f"{root}/d", ".parquet") == ["1.parquet", "2.parquet", "_hidden.parquet"]


def test_missing_input_is_a_clear_error(root: str) -> None:
    with pytest.raises(FileNotFoundError, match="no Parquet files|does not exist"):
        Storage().list_inputs(f"{root}/nothing-here")


def test_wrong_bucket_names_the_bucket(s3) -> None:
    store = Storage()
    with pytest.raises(StorageError, match=r"'no-such-bucket'.*NoSuchBucket"):
        store.list_inputs("s3://no-such-bucket/prompts/")
    with pytest.raises(StorageError, match=r"'no-such-bucket'"):
        store.check_output("s3://no-such-bucket/out")


def test_unknown_profile_is_a_clear_error(s3) -> None:
    with pytest.raises(StorageError, match="profile 'nobody'"):
        Storage(StorageSpec(profile="nobody")).list_inputs("s3://b/x")


def test_listing_by_name_prefix(root: str) -> None:
    store = Storage()
    for name in ("shard-000007-a.parquet", "shard-000007-b.parquet", "shard-000070-c.parquet",
                 "shard-000007-d.json", "sub/shard-000007-e.parquet"):
        store.write_atomic(f"{root}/d/{name}", b"x")
    assert store.list_files(f"{root}/d", ".parquet", prefix="shard-000007-") == [
        "shard-000007-a.parquet", "shard-000007-b.parquet"]
    assert store.list_files(f"{root}/d", prefix="shard-000008-") == []



def test_a_listing_gives_versions_that_change_only_when_a_file_is_written(root: str) -> None:
    """What tells a lease nobody renews (tasks/store/claims.py), without reading it."""
    store = Storage()
    v = store.write_atomic(f"{root}/c/1.json", b"a", if_absent=True)
    store.write_atomic(f"{root}/c/2.json", b"b", if_absent=True)
    store.write_atomic(f"{root}/c/sub/3.json", b"c")
    first = store.list_versions(f"{root}/c", ".json")
    assert sorted(first) == ["1.json", "2.json"]
    assert store.list_versions(f"{root}/c", ".json") == first
    store.write_atomic(f"{root}/c/1.json", b"a renewed", if_match=v)
    second = store.list_versions(f"{root}/c", ".json")
    assert second["1.json"] != first["1.json"] and second["2.json"] == first["2.json"]
    assert store.list_versions(f"{root}/nothing") == {}


CAS_HOLDER = """
import os, signal, sys
from thinkbatch.tasks.store import storage

path = sys.argv[1]
store = storage.Storage()
version = store.read_versioned(path)[1]
read = storage._Local.read_versioned

def stall(self, p):  # inside the compare-and-swap, with the lock held: read, then stop
    current = read(self, p)
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    return current

storage._Local.read_versioned = stall
try:
    store.write_atomic(path, b"holder", if_match=version)
    print("written", flush=True)
except storage.VersionMismatch:
    print("VersionMismatch", flush=True)
"""


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"


def test_a_writer_stopped_inside_a_compare_and_swap_blocks_no_one_and_cannot_overwrite(
        tmp_path: Path) -> None:
    """A process SIGSTOPped inside a local compare-and-swap (a frozen container): the next
    writer breaks its lock after lock_timeout_s and writes; the stopped one, continued,
    loses its write instead of overwriting the newer version."""
    path = str(tmp_path / "_claims" / "000001.json")
    store = Storage(lock_timeout_s=0.5)
    version = store.write_atomic(path, b"first")
    holder = subprocess.Popen([sys.executable, "-c", CAS_HOLDER, path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        deadline = time.monotonic() + 10
        while not _stopped(holder.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        second = store.write_atomic(path, b"second", if_match=version)
        assert time.monotonic() - started < 3
        holder.send_signal(signal.SIGCONT)
        assert holder.communicate(timeout=30)[0].strip() == "VersionMismatch"
    finally:
        holder.kill()
        holder.wait()
    assert store.read_versioned(path) == (b"second", second)
    assert os.listdir(tmp_path / "_claims") == ["000001.json"]  # no lock or staged file left


RACER = """
import json, random, sys, threading, time
from thinkbatch.tasks.store import storage
from thinkbatch.tasks.store.storage import AlreadyExists, Storage, VersionMismatch

root, target, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stores = {"patient": Storage(), "impatient": Storage(lock_timeout_s=0.005)}
read = storage._Local.read_versioned

def slow(self, p):  # also inside the compare-and-swap: now and then a holder stalls there
    current = read(self, p)
    if random.random() < 0.1:
        time.sleep(0.02)
    return current

storage._Local.read_versioned = slow
won = {"created": [], "patient": [], "impatient": []}
print("ready", flush=True)
sys.stdin.readline()

def race():
    for k in range(20):
        try:
            stores["patient"].write_atomic(f"{root}/created-{k}", b"x", if_absent=True)
            won["created"].append(k)
        except AlreadyExists:
            pass
    for name, store in stores.items():
        while True:
            data, version = store.read_versioned(f"{root}/{name}")
            n = int(data)
            if n >= target:
                break
            try:
                store.write_atomic(f"{root}/{name}", str(n + 1).encode(), if_match=version)
                won[name].append(n + 1)
            except VersionMismatch:
                pass

workers = [threading.Thread(target=race) for _ in range(threads)]
for t in workers:
    t.start()
for t in workers:
    t.join()
print(json.dumps(won), flush=True)
"""


def test_racing_processes_and_threads_get_one_winner_per_version(tmp_path: Path) -> None:
    """4 processes x 2 threads race create-if-absent and replace-if-unchanged on the same
    objects: every object is created once, every version of a counter has exactly one
    writer (no lost update), also when waiters break the locks of holders that pause
    inside (20 ms against a lock_timeout_s of 5 ms: they get fenced, never overwrite)."""
    store, target = Storage(), 80
    for name in ("patient", "impatient"):
        store.write_atomic(str(tmp_path / name), b"0")
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(target), "2"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    try:
        assert all(r.stdout.readline().strip() == "ready" for r in racers)
        for r in racers:
            r.stdin.write("go\n")
            r.stdin.flush()
        won = [json.loads(r.communicate(timeout=120)[0]) for r in racers]
    finally:
        for r in racers:
            r.kill()
            r.wait()
    assert sorted(k for w in won for k in w["created"]) == list(range(20))
    for name in ("patient", "impatient"):
        assert sorted(n for w in won for n in w[name]) == list(range(1, target + 1))
        assert store.read_bytes(str(tmp_path / name)) == str(target).encode()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["patient", "impatient", *(f"created-{k}" for k in range(20))])
