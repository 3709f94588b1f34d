"""Storage behaves the same on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkbatch.schemas.job import StorageSpec
from thinkbatch.tasks.storage import AlreadyExists, Storage, StorageError, VersionMismatch

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
