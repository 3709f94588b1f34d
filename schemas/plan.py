"""The plan: input files (from footers only) cut into fixed-size shards of rows."""

from __future__ import annotations

from collections.abc import Collection

from pydantic import BaseModel


class InputFile(BaseModel):
    path: str
    size: int
    version: str  # mtime (local) or ETag (object store): changes when the file does
    num_rows: int
    row_group_rows: list[int]
    first_row: int  # global index of the file's first row in plan order


class Segment(BaseModel):
    """Rows [start, stop) of one file."""

    file: int
    start: int
    stop: int


class Shard(BaseModel):
    shard_id: int
    first_row: int  # global row index of the shard's first row
    num_rows: int
    segments: list[Segment]


class Plan(BaseModel):
    files: list[InputFile]
    shards: list[Shard]
    total_rows: int
    fingerprint: str
    fingerprint_parts: dict[str, str]
    # Rows keep their start, finish and worker (schemas/output.py ROW_TIME_NAMES). False in
    # plans written before they did: such an output is resumed without those columns.
    row_times: bool = False

    def rows_in(self, shard_ids: Collection[int]) -> int:
        """Input rows of these shards (the done ones, say)."""
        return sum(s.num_rows for s in self.shards if s.shard_id in shard_ids)

    def percent_in(self, shard_ids: Collection[int]) -> float:
        """These shards' share of the input rows, in percent (0 for an empty input)."""
        return 100 * self.rows_in(shard_ids) / max(self.total_rows, 1)
