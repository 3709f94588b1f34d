"""Streaming a shard's rows as Arrow record batches; never a whole file in memory."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from thinkbatch.schemas.plan import InputFile, Plan, Shard
from thinkbatch.tasks.store.storage import Storage

ROW_INDEX = "__row_index"
ROW_ID = "__row_id"


def input_schema(store: Storage, plan: Plan, columns: list[str]) -> pa.Schema:
    """The needed columns' types, from the first file's footer."""
    schema = store.open_parquet(plan.files[0].path).schema_arrow
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise ValueError(f"input {plan.files[0].path} lacks columns {missing}; "
                         f"it has {schema.names}")
    return pa.schema([schema.field(c) for c in columns])


def _segment_batches(store: Storage, f: InputFile, start: int, stop: int, columns: list[str],
                     batch_size: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Rows [start, stop) of one file, reading only the row groups that hold them."""
    groups, offsets, pos = [], [], 0
    for i, n in enumerate(f.row_group_rows):
        if pos < stop and pos + n > start:
            groups.append(i)
            offsets.append(pos)
        pos += n
    if not groups:
        return
    pf = store.open_parquet(f.path)
    pos = offsets[0]
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if hi > lo:
            yield batch.slice(lo, hi - lo), pos + lo
        pos += batch.num_rows


def shard_batches(store: Storage, plan: Plan, shard: Shard, columns: list[str],
                  id_column: str | None,
                  batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """The shard's rows plus the global row index and the row id (the id column as
    text, else `file:row` so an id stays stable when files are added to the input)."""
    for seg in shard.segments:
        f = plan.files[seg.file]
        for batch, file_row in _segment_batches(store, f, seg.start, seg.stop, columns,
                                                batch_size):
            first = f.first_row + file_row
            idx = pa.array(range(first, first + batch.num_rows), pa.int64())
            if id_column:
                ids = batch.column(id_column).cast(pa.string())
            else:
                ids = pa.array([f"{f.path}:{file_row + i}" for i in range(batch.num_rows)])
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, idx, ids], names=[*batch.schema.names, ROW_INDEX, ROW_ID]
            )
