"""Planning: list inputs, read only Parquet footers, cut rows into fixed-size shards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.plan import InputFile, Plan, Segment, Shard
from thinkbatch.tasks.store.fingerprint import digest, fingerprint_parts
from thinkbatch.tasks.store.storage import FileStat, Storage


FOOTER_READERS = 16  # footers are tiny ranged reads: latency-bound on object stores
FOOTERS_KEPT = 65536  # per process; more files than this are read again by planning


@dataclass(frozen=True)
class Footer:
    """What validation and planning need of a Parquet file's footer."""

    schema: pa.Schema
    row_group_rows: tuple[int, ...]


# Keyed by the file's stat (path, size, mtime or ETag): a changed file is read again.
# Validation, the flow's own check and planning of one run thus read each footer once.
_footers: dict[FileStat, Footer] = {}
_schemas: dict[pa.Schema, pa.Schema] = {}  # one object for the many files sharing one


def _footer(store: Storage, f: FileStat) -> Footer | Exception:
    if (known := _footers.get(f)) is not None:
        return known
    try:
        pf = store.open_parquet(f.path)
        meta, schema = pf.metadata, pf.schema_arrow.remove_metadata()
    except (OSError, pa.ArrowException) as e:
        return e
    if len(_footers) >= FOOTERS_KEPT:
        _footers.clear()
        _schemas.clear()
    footer = Footer(_schemas.setdefault(schema, schema),
                    tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    _footers[f] = footer
    return footer


def read_footers(store: Storage, files: list[FileStat]) -> list[Footer | Exception]:
    """Every file's footer, or the error that makes it unreadable Parquet: validation
    names every bad file at once."""
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        return list(pool.map(lambda f: _footer(store, f), files))


def input_files(files: list[FileStat], footers: list[Footer]) -> list[InputFile]:
    out, first = [], 0
    for f, footer in zip(files, footers):
        rows = list(footer.row_group_rows)
        out.append(InputFile(path=f.path, size=f.size, version=f.version,
                             num_rows=sum(rows), row_group_rows=rows, first_row=first))
        first += sum(rows)
    return out


def cut_shards(files: list[InputFile], rows_per_shard: int) -> list[Shard]:
    """Deterministic: the same files and size always give the same shards. A shard may
    span files so every shard but the last has exactly rows_per_shard rows."""
    shards: list[Shard] = []
    segments: list[Segment] = []
    filled, first = 0, 0
    for index, f in enumerate(files):
        pos = 0
        while pos < f.num_rows:
            take = min(rows_per_shard - filled, f.num_rows - pos)
            segments.append(Segment(file=index, start=pos, stop=pos + take))
            pos += take
            filled += take
            if filled == rows_per_shard:
                shards.append(Shard(shard_id=len(shards), first_row=first,
                                    num_rows=filled, segments=segments))
                first += filled
                segments, filled = [], 0
    if filled:
        shards.append(Shard(shard_id=len(shards), first_row=first,
                            num_rows=filled, segments=segments))
    return shards


def make_plan(job: JobSpec, store: Storage) -> Plan:
    stats = store.list_inputs(job.input.path)
    footers = read_footers(store, stats)
    for f, footer in zip(stats, footers):
        if isinstance(footer, Exception):
            raise ValueError(f"input {f.path} is not readable Parquet: {footer}")
    files = input_files(stats, footers)
    parts = fingerprint_parts(job, stats)
    return Plan(
        files=files,
        shards=cut_shards(files, job.shards.rows_per_shard),
        total_rows=sum(f.num_rows for f in files),
        fingerprint=digest(parts),
        fingerprint_parts=parts,
        row_times=True,
    )
