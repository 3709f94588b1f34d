"""Storage behaves the same on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkbatch.schemas.job import StorageSpec
from thinkbatch.tasks.store.storage import (AlreadyExists, LockTimeout, Storage, StorageError,
                                      VersionMismatch)

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


CAS_HOLDER = """
import os, signal, sys
from thinkbatch.tasks.store import storage

path = sys.argv[1]
store = storage.Storage()
version = store.read_versioned(path)[1]
read = storage._Local.read_versioned

def stall(self, p):  # called inside the compare-and-swap, with the folder's lock held
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    return read(self, p)

storage._Local.read_versioned = stall
store.write_atomic(path, b"holder", if_match=version)
"""


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"


def test_a_stopped_lock_holder_costs_a_bounded_wait_and_is_named(tmp_path: Path) -> None:
    """A process SIGSTOPped inside a local compare-and-swap keeps the folder's lock: the
    next writer gives up after lock_timeout_s, naming the lock file and the holder."""
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
        with pytest.raises(LockTimeout, match=rf"_claims/\.thinkbatch-cas\.lock stayed locked "
                                              rf"for 0\.5s by pid {holder.pid} \(stopped\)"):
            store.write_atomic(path, b"second", if_match=version)
        assert time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait()
    assert store.write_atomic(path, b"third", if_match=version)  # the lock died with it
