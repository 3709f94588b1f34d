"""Planning: list inputs, read only Parquet footers, cut rows into fixed-size shards."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.plan import InputFile, Plan, Segment, Shard
from thinkbatch.tasks.storage import FileStat, Storage
from thinkbatch.tasks.fingerprint import digest, fingerprint_parts


FOOTER_READERS = 16  # footers are tiny ranged reads: latency-bound on object stores


def read_footers(store: Storage, files: list[FileStat]) -> list[InputFile]:
    def row_groups(f: FileStat) -> list[int]:
        meta = store.open_parquet(f.path).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        groups = list(pool.map(row_groups, files))
    out, first = [], 0
    for f, g in zip(files, groups):
        out.append(InputFile(path=f.path, size=f.size, version=f.version,
                             num_rows=sum(g), row_group_rows=g, first_row=first))
        first += sum(g)
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
    files = read_footers(store, stats)
    parts = fingerprint_parts(job, stats)
    return Plan(
        files=files,
        shards=cut_shards(files, job.shards.rows_per_shard),
        total_rows=sum(f.num_rows for f in files),
        fingerprint=digest(parts),
        fingerprint_parts=parts,
    )
