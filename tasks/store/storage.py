"""All storage access, local disk and S3 behind one interface.

The rest of the code holds paths as strings (`/data/out` or `s3://bucket/out`) and calls
a `Storage`; nothing else touches a file system or boto3. Atomicity is what
exactly-once rests on: an object is either absent or complete, never partial (local:
write a hidden temporary, then rename; S3: one PUT). Where two writers could race,
writes are conditional (create-if-absent, replace-if-unchanged), and the loser gets a
clear error. No process that stalls (SIGSTOP, a frozen container) can block the others:
a local compare-and-swap holds its lock only for a read and a rename, and a waiter that
sees the same holder for `lock_timeout_s` breaks the lock, fencing that holder first
(see `_Local.replace_if_unchanged`).

S3: boto3 is the source of credentials and endpoint (the standard chain: environment,
shared config/profile, instance or pod role; `AWS_ENDPOINT_URL` is honoured), plus the
job's `storage` section. Parquet is read in ranges through pyarrow's S3 file system built
from the same boto3-resolved credentials, never downloaded whole. Transient faults are
retried by botocore's standard retry mode (and pyarrow's standard S3 retry strategy).
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import io
import logging
import os
import random
import socket
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from thinkbatch.schemas.job import StorageSpec

log = logging.getLogger("thinkbatch.storage")

TMP_SUFFIX = ".tmp"
CAS_SUFFIX = ".cas"  # `.NAME.cas/`: the object's compare-and-swap lock (a folder)
LOCK_TIMEOUT_S = 5.0  # the guarded step is a read and a rename: longer means a stalled holder
PAGE_SIZE = 1000  # keys per S3 listing request (the most S3 returns)
_GLOB_CHARS = "*?["


class AlreadyExists(FileExistsError):
    """A create-if-absent write lost the race: another writer got there first."""


class VersionMismatch(RuntimeError):
    """A replace-if-unchanged write lost: the object changed since it was read."""


class StorageError(RuntimeError):
    """A permanent storage problem (no such bucket, access denied, no credentials)."""


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    version: str  # mtime (local) or ETag (S3): changes whenever the content does


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _holder(lock: str) -> str | None:
    """The token (a staged file's name) in a compare-and-swap lock; None if it is free."""
    try:
        names = os.listdir(lock)
    except FileNotFoundError:
        return None
    return names[0] if names else None


def _unlock(lock: str, token: str) -> None:
    """Empty the lock of this token, then remove it if it is still empty (if not, the
    next holder already renamed its own into place)."""
    with suppress(FileNotFoundError):
        os.unlink(os.path.join(lock, token))
    try:
        os.rmdir(lock)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise


def _break(lock: str, token: str, held_s: float) -> None:
    """Take a stalled holder's lock away, fencing it first: its staged file goes, so
    its write (the rename of that file) cannot follow ours."""
    try:
        with open(os.path.join(lock, token)) as f:
            who = f.read()
    except FileNotFoundError:
        return  # released meanwhile
    try:
        os.unlink(os.path.join(os.path.dirname(lock), token))
        outcome = "its write will fail"
    except FileNotFoundError:
        outcome = "it had written"
    _unlock(lock, token)
    log.warning("broke %s, held for %.2fs by %s (stalled?): %s", lock, held_s, who, outcome)


class _Local:
    def __init__(self, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.lock_timeout_s = lock_timeout_s

    def list_inputs(self, spec: str) -> list[FileStat]:
        if any(c in spec for c in _GLOB_CHARS):
            paths = glob.glob(spec, recursive=True)
        elif os.path.isdir(spec):
            paths = [str(p) for p in Path(spec).rglob("*.parquet")]
        elif os.path.exists(spec):
            paths = [spec]
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist")
        stats = []
        for p in sorted(p for p in paths if os.path.isfile(p) and not _hidden(p)):
            st = os.stat(p)
            stats.append(FileStat(p, st.st_size, str(st.st_mtime_ns)))
        return stats

    def list_names(self, folder: str, prefix: str = "") -> list[str]:
        try:
            with os.scandir(folder) as entries:
                return [e.name for e in entries if e.name.startswith(prefix)]
        except FileNotFoundError:
            return []

    def list_versions(self, folder: str, prefix: str = "") -> dict[str, str]:
        """Name -> its version: a replaced file (an atomic write renames a new inode into
        place) has a new inode number or modification time."""
        try:
            with os.scandir(folder) as entries:
                out = {}
                for e in entries:
                    if e.name.startswith(prefix):
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        out[e.name] = f"{st.st_ino}-{st.st_mtime_ns}"
                return out
        except FileNotFoundError:
            return {}

    def open_input(self, path: str) -> Any:
        return pa.OSFile(path)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        with open(path, "rb") as f:
            data = f.read()
        return data, _etag(data)

    def read_with_age(self, path: str) -> tuple[bytes, str, float]:
        with open(path, "rb") as f:
            data = f.read()
            modified = os.fstat(f.fileno()).st_mtime
        return data, _etag(data), time.time() - modified

    def write(self, path: str, data: bytes, *, if_absent: bool, if_match: str | None) -> str:
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        staged = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if if_absent:
                try:
                    os.link(staged, path)
                except FileExistsError:
                    raise AlreadyExists(path) from None
            elif if_match is not None:
                self.replace_if_unchanged(path, staged, if_match)
            else:
                os.replace(staged, path)
        finally:
            with suppress(FileNotFoundError):  # renamed, or removed by a waiter (below)
                os.unlink(staged)
        return _etag(data)

    def replace_if_unchanged(self, path: str, staged: str, if_match: str) -> None:
        """Rename `staged` over `path` if `path` is still at version `if_match`.

        POSIX has no conditional rename, so a read and a rename run under the object's
        lock: the folder `.NAME.cas/`, renamed into place holding one file named for the
        holder's staged file (a rename lands only on an absent or empty folder: one holder
        at a time). The holder's write is the rename of that staged file. A waiter that
        sees the same holder for `lock_timeout_s` deletes the staged file first, so that
        write can no longer happen, and only then empties the lock: a holder stopped in
        here (SIGSTOP, a frozen container) delays others by `lock_timeout_s` at most, and
        once it goes on it gets VersionMismatch instead of overwriting a newer version."""
        lock, token = self._lock(path, staged)
        try:
            try:
                current = self.read_versioned(path)[1]
            except FileNotFoundError:
                current = None
            if current != if_match:
                raise VersionMismatch(path)
            try:
                os.rename(staged, path)
            except FileNotFoundError:  # a waiter broke our lock: its write goes first
                raise VersionMismatch(path) from None
        finally:
            _unlock(lock, token)

    def _lock(self, path: str, staged: str) -> tuple[str, str]:
        folder, name = os.path.split(path)
        lock = os.path.join(folder or ".", f".{name}{CAS_SUFFIX}")
        token = os.path.basename(staged)
        ready = os.path.join(folder or ".", f".{name}.{uuid.uuid4().hex}{CAS_SUFFIX}")
        os.mkdir(ready)
        try:
            with open(os.path.join(ready, token), "w") as f:
                f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            seen, since = None, time.monotonic()
            while True:
                try:
                    os.rename(ready, lock)
                    return lock, token
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                holder, now = _holder(lock), time.monotonic()
                if holder != seen:
                    seen, since = holder, now
                elif holder is not None and now - since >= self.lock_timeout_s:
                    _break(lock, holder, now - since)
                time.sleep(random.uniform(0.001, 0.01))
        finally:
            if os.path.isdir(ready):  # not renamed into place: an error
                _unlock(ready, token)

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def remove_temporaries(self, folder: str) -> int:
        names = [n for n in self.list_names(folder) if n.startswith(".") and n.endswith(TMP_SUFFIX)]
        for name in names:
            os.unlink(os.path.join(folder, name))
        return len(names)

    def check_output(self, path: str) -> None:
        parent = Path(path).resolve()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise StorageError(f"{str(parent)!r} is an existing file; the output is a folder")
        if not os.access(parent, os.W_OK):
            raise StorageError(f"cannot write under {str(parent)!r}: permission denied")


# HEAD requests carry no error body: name the cause from the status.
_HTTP_CODES = {"404": "NoSuchBucket", "403": "AccessDenied", "400": "BadRequest"}
_MEANING = {"NoSuchBucket": "the bucket does not exist",
            "AccessDenied": "these credentials may not access it"}


def _split(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


class _S3:
    def __init__(self, options: StorageSpec, page_size: int = PAGE_SIZE):
        from botocore.config import Config

        self.options = options
        self.page_size = page_size
        self._session_obj = self._session(options)
        self.client = self._session_obj.client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region,
            config=Config(retries={"mode": "standard", "max_attempts": options.max_attempts},
                          connect_timeout=5, read_timeout=60),
        )

    @staticmethod
    def _session(options: StorageSpec) -> Any:
        import boto3

        if options.aws_credentials_block:
            try:
                from prefect_aws import AwsCredentials
            except ImportError:
                raise StorageError("storage.aws_credentials_block needs prefect-aws installed "
                                   "(pip install prefect-aws)") from None
            return AwsCredentials.load(options.aws_credentials_block).get_boto3_session()
        try:
            return boto3.Session(profile_name=options.profile, region_name=options.region)
        except Exception as e:  # ProfileNotFound: say which, never echo secrets
            raise StorageError(f"AWS profile {options.profile!r}: {type(e).__name__}") from None

    @cached_property
    def arrow_fs(self) -> Any:
        """pyarrow's S3 file system from the same boto3-resolved credentials and endpoint."""
        from pyarrow import fs

        creds = self._session_obj.get_credentials()
        kwargs: dict[str, Any] = {
            "region": self.client.meta.region_name or "us-east-1",
            "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=self.options.max_attempts),
            "connect_timeout": 5, "request_timeout": 60,
        }
        endpoint = urlparse(self.client.meta.endpoint_url)
        if not endpoint.netloc.endswith("amazonaws.com"):
            kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
        if creds is None:
            kwargs["anonymous"] = True
        else:
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                          session_token=frozen.token)
        return fs.S3FileSystem(**kwargs)

    def _fail(self, err: Exception, bucket: str, what: str) -> StorageError:
        """A clear message naming the bucket and the cause, and no secrets."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(err, NoCredentialsError):
            return StorageError(f"s3 bucket {bucket!r}: no AWS credentials found (environment, "
                                "profile, role or storage.aws_credentials_block)")
        if isinstance(err, ClientError):
            e = err.response.get("Error", {})
            code = _HTTP_CODES.get(e.get("Code", ""), e.get("Code"))
            message = e.get("Message") or _MEANING.get(code, "")
            return StorageError(f"s3 bucket {bucket!r}: {what} failed: {code} ({message})")
        return StorageError(f"s3 bucket {bucket!r}: {what} failed: {type(err).__name__}: {err}")

    def _list(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix,
                    PaginationConfig={"PageSize": self.page_size}):
                out += page.get("Contents", [])
        except Exception as e:
            raise self._fail(e, bucket, f"listing {prefix!r}") from None
        return out

    def list_inputs(self, spec: str) -> list[FileStat]:
        bucket, key = _split(spec)
        if any(c in key for c in _GLOB_CHARS):
            cut = min(key.find(c) for c in _GLOB_CHARS if c in key)
            objects = [o for o in self._list(bucket, key[:cut]) if fnmatch.fnmatchcase(o["Key"], key)]
        else:
            folder = key.rstrip("/") + "/" if key else ""
            objects = ([o for o in self._list(bucket, key) if o["Key"] == key]
                       if key.endswith(".parquet") else [])  # else a folder: listed once
            if not objects:
                objects = [o for o in self._list(bucket, folder) if o["Key"].endswith(".parquet")]
        return sorted((FileStat(f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"'))
                       for o in objects if not _hidden(o["Key"])), key=lambda f: f.path)

    def list_names(self, folder: str, prefix: str = "") -> list[str]:
        return list(self.list_versions(folder, prefix))

    def list_versions(self, folder: str, prefix: str = "") -> dict[str, str]:
        """Name -> ETag, from the listing itself: no request per object."""
        bucket, key = _split(folder)
        under = key.rstrip("/") + "/"
        return {o["Key"][len(under):]: o["ETag"].strip('"')
                for o in self._list(bucket, under + prefix) if "/" not in o["Key"][len(under):]}

    def open_input(self, path: str) -> Any:
        return self.arrow_fs.open_input_file(path.removeprefix("s3://"))

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        return self.read_with_age(path)[:2]

    def read_with_age(self, path: str) -> tuple[bytes, str, float]:
        bucket, key = _split(path)
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(path) from None
        date = obj["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        # Both stamps are whole seconds: the age is at most a second under its truth.
        age = (now - obj["LastModified"]).total_seconds() - 1.0
        return obj["Body"].read(), obj["ETag"].strip('"'), age

    def write(self, path: str, data: bytes, *, if_absent: bool, if_match: str | None) -> str:
        from botocore.exceptions import ClientError

        bucket, key = _split(path)
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        elif if_match is not None:
            conditions["IfMatch"] = f'"{if_match}"'
        try:
            return self.client.put_object(Bucket=bucket, Key=key, Body=data,
                                          **conditions)["ETag"].strip('"')
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code == "PreconditionFailed" and if_absent:
                raise AlreadyExists(path) from None
            if code in ("PreconditionFailed", "NoSuchKey") and if_match is not None:
                raise VersionMismatch(path) from None
            if code == "ConditionalRequestConflict":
                raise (AlreadyExists if if_absent else VersionMismatch)(path) from None
            raise self._fail(e, bucket, f"writing {key!r}") from None

    def delete(self, path: str) -> None:
        bucket, key = _split(path)
        self.client.delete_object(Bucket=bucket, Key=key)

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = _split(path)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise self._fail(e, bucket, f"reading {key!r}") from None

    def remove_temporaries(self, folder: str) -> int:
        return 0  # one PUT per object: S3 never holds a partial one

    def check_output(self, path: str) -> None:
        bucket, _ = _split(path)
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as e:
            raise self._fail(e, bucket, "access") from None


class Storage:
    """Local paths and s3:// URLs, chosen per path."""

    def __init__(self, options: StorageSpec | None = None, *, page_size: int = PAGE_SIZE,
                 lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.options = options or StorageSpec()
        self.page_size = page_size  # keys per S3 listing request
        self._local = _Local(lock_timeout_s)

    @cached_property
    def _s3(self) -> _S3:
        return _S3(self.options, self.page_size)

    def _for(self, path: str) -> _Local | _S3:
        return self._s3 if is_s3(path) else self._local

    def list_inputs(self, spec: str) -> list[FileStat]:
        """A Parquet file, a folder or prefix (recursively) or a glob -> sorted stats."""
        files = self._for(spec).list_inputs(spec)
        if not files:
            raise FileNotFoundError(f"input {spec!r} matches no Parquet files")
        return files

    def list_files(self, folder: str, suffix: str = "", prefix: str = "") -> list[str]:
        """Names (not paths) of the files directly in a folder that start with `prefix`;
        hidden ones (temporaries, the local compare-and-swap locks) excluded. On S3 the
        prefix is the listing's own, so finding one shard's parts costs one request
        however many objects the folder holds; locally it filters one directory scan."""
        return sorted(n for n in self._for(folder).list_names(folder, prefix)
                      if n.endswith(suffix) and not n.startswith("."))

    def list_versions(self, folder: str, suffix: str = "") -> dict[str, str]:
        """`list_files` with each file's version as the listing gives it (S3: its ETag;
        local: inode and mtime): a file seen twice at the same version was not written
        in between, which no clock has to say."""
        return {n: v for n, v in self._for(folder).list_versions(folder).items()
                if n.endswith(suffix) and not n.startswith(".")}

    def open_parquet(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(self._for(path).open_input(path))

    def read_columns(self, path: str, columns: list[str]) -> pa.Table:
        return self.open_parquet(path).read(columns=columns)

    def read_bytes(self, path: str) -> bytes:
        return self._for(path).read_versioned(path)[0]

    def write_parquet(self, path: str, table: pa.Table, compression: str = "zstd") -> str:
        """One atomic object: the whole table or nothing."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression=compression)
        return self.write_atomic(path, sink.getvalue())

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Content and its version (ETag), for a later write(if_match=version)."""
        return self._for(path).read_versioned(path)

    def read_with_age(self, path: str) -> tuple[bytes, str, float]:
        """Content, version and seconds since the object was last written, by the store's
        own clock (S3: the response's Date against LastModified; local: the file's mtime
        against this machine's clock): a writer's clock, however wrong, never enters it."""
        return self._for(path).read_with_age(path)

    def write_atomic(self, path: str, data: bytes, *, if_absent: bool = False,
                     if_match: str | None = None) -> str:
        """Write all of `data` or nothing; returns the new version. With if_absent, fail
        if the object exists; with if_match, fail if it changed since that version."""
        return self._for(path).write(path, data, if_absent=if_absent, if_match=if_match)

    def exists(self, path: str) -> bool:
        return self._for(path).exists(path)

    def delete(self, path: str) -> None:
        self._for(path).delete(path)

    def remove_temporaries(self, folder: str) -> int:
        """Delete what a killed local writer left half-written; returns how many."""
        return self._for(folder).remove_temporaries(folder)

    def check_output(self, path: str) -> None:
        """Raise StorageError now for what would fail every commit later."""
        self._for(path).check_output(path)
