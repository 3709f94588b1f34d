"""Planning: list inputs, read only Parquet footers, cut rows into fixed-size shards."""

from __future__ import annotations

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.plan import InputFile, Plan, Segment, Shard
from thinkbatch.tasks import storage
from thinkbatch.tasks.fingerprint import digest, fingerprint_parts


def read_footers(files: list[storage.FileStat]) -> list[InputFile]:
    out, first = [], 0
    for f in files:
        meta = storage.open_parquet(f.path).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        out.append(InputFile(path=f.path, size=f.size, version=f.version,
                             num_rows=meta.num_rows, row_group_rows=groups, first_row=first))
        first += meta.num_rows
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


def make_plan(job: JobSpec) -> Plan:
    stats = storage.list_inputs(job.input.path)
    files = read_footers(stats)
    parts = fingerprint_parts(job, stats)
    return Plan(
        files=files,
        shards=cut_shards(files, job.shards.rows_per_shard),
        total_rows=sum(f.num_rows for f in files),
        fingerprint=digest(parts),
        fingerprint_parts=parts,
    )
