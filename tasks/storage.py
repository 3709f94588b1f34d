"""All storage access: listing inputs, opening Parquet, atomic writes of outputs.

The rest of the code sees paths as strings and calls these functions; nothing else
touches the file system. Atomicity is what exactly-once rests on: a file is either
absent or complete, never partial.
"""

from __future__ import annotations

import glob
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

TMP_SUFFIX = ".tmp"


class AlreadyExists(FileExistsError):
    """A create-if-absent write lost the race: another writer got there first."""


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    version: str  # changes whenever the content does


def join(*parts: str) -> str:
    return str(Path(parts[0]).joinpath(*parts[1:]))


def _stat(path: str) -> FileStat:
    st = os.stat(path)
    return FileStat(path=path, size=st.st_size, version=str(st.st_mtime_ns))


def list_inputs(spec: str) -> list[FileStat]:
    """A Parquet file, a directory (recursively) or a glob -> sorted file stats."""
    if any(c in spec for c in "*?["):
        paths = glob.glob(spec, recursive=True)
    elif os.path.isdir(spec):
        paths = [str(p) for p in Path(spec).rglob("*.parquet")]
    elif os.path.exists(spec):
        paths = [spec]
    else:
        raise FileNotFoundError(f"input {spec!r} does not exist")
    files = sorted(p for p in paths if os.path.isfile(p) and not _hidden(p))
    if not files:
        raise FileNotFoundError(f"input {spec!r} matches no Parquet files")
    return [_stat(p) for p in files]


def _hidden(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith((".", "_"))


def list_files(folder: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the committed files in a folder; temporaries excluded."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(suffix) and not n.endswith(TMP_SUFFIX))


def open_parquet(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path, memory_map=False)


def exists(path: str) -> bool:
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path: str, data: bytes, *, if_absent: bool = False) -> None:
    """Write all of `data` or nothing. With if_absent, fail if `path` already exists."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if if_absent:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(path) from None
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temporaries(folder: str) -> int:
    """Delete what a killed writer left half-written; returns how many."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


def delete(path: str) -> None:
    os.unlink(path)
