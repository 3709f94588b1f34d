from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.checkpoint import ResumeRefused
from thinkbatch.tasks.store.commit import Committer
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

LOCAL = Storage()


def _job(tmp_path: Path, **sampling):
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(10))
    return load_job(inline={"input": {"path": str(inputs)}, "engine": {"model": "m"},
                            "sampling": sampling, "output": {"path": str(tmp_path / "out")}})


def test_plan_written_first_and_resume_checks_fingerprint(tmp_path: Path) -> None:
    job = _job(tmp_path, temperature=0.6)
    layout = OutputLayout(job.output.path, LOCAL)
    plan, resumed = checkpoint.open_plan(layout, make_plan(job, LOCAL))
    assert not resumed and LOCAL.exists(layout.plan)
    again, resumed = checkpoint.open_plan(layout, make_plan(job, LOCAL))
    assert resumed and again == plan
    changed = _job(tmp_path, temperature=1.0)
    with pytest.raises(ResumeRefused, match=r"sampling\.temperature: 0\.6 -> 1\.0"):
        checkpoint.open_plan(layout, make_plan(changed, LOCAL))
    forced, resumed = checkpoint.open_plan(layout, make_plan(changed, LOCAL), force_resume=True)
    assert resumed and forced == plan


def _row(i: int, status: str = "ok") -> dict:
    return {"id": f"r{i}", "row_index": i, "sample_index": 0, "status": status, "prompt_tokens": 3,
            "completion_tokens": 5}


def test_committer_parts_are_atomic_and_counted(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"), LOCAL)
    done: dict[int, ShardStats] = {}
    c = Committer(layout, output_schema(), flush_rows=4, flush_seconds=60, compression="zstd",
                  on_shard_done=lambda s, stats: done.__setitem__(s, stats),
                  may_commit=lambda shard_id: True)
    for i in range(10):
        c.add(0, _row(i, "ok" if i % 3 else "invalid_input"))
        c.maybe_flush()
    c.add(1, _row(10))
    c.finish_shard(0)
    c.close()
    assert checkpoint.committed_keys(layout, 0) == {(i, 0) for i in range(10)}
    assert checkpoint.committed_keys(layout, 1) == set()  # buffered, never committed
    assert checkpoint.done_stats(layout, 0) == done[0]
    # The marker keeps the keys earlier versions wrote, so their outputs resume, and adds
    # each part's commit time (the report's throughput over the run).
    marker = json.loads(LOCAL.read_bytes(layout.done_marker(0)))
    committed_at = marker.pop("committed_at")
    assert marker == {
        "rows": 10, "status": {"invalid_input": 4, "ok": 6}, "prompt_tokens": 30,
        "completion_tokens": 50, "parts": [p.rsplit("/", 1)[-1] for p in layout.parts_of(0)]}
    assert sorted(committed_at) == marker["parts"] and len(marker["parts"]) == 3
    assert all(0 <= time.time() - t < 60 for t in committed_at.values())
    assert list(done) == [0]
    table = pa.concat_tables(pq.read_table(p) for p in layout.parts_of(0))
    assert table.schema.names == output_schema().names


def test_leftover_temporaries_are_invisible_and_removed_on_resume(tmp_path: Path) -> None:
    job = _job(tmp_path)
    layout = OutputLayout(job.output.path, LOCAL)
    checkpoint.open_plan(layout, make_plan(job, LOCAL))
    Path(layout.data).mkdir(parents=True)
    junk = Path(layout.data) / ".shard-000000-abc.parquet.123.tmp"
    junk.write_bytes(b"half a part")
    assert layout.all_parts() == []
    checkpoint.open_plan(layout, make_plan(job, LOCAL))
    assert not junk.exists()



def test_duplicate_rows_from_a_fenced_out_writer_are_compacted_and_orphans_swept(
        tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"), LOCAL)
    schema = output_schema()
    write = lambda rows: LOCAL.write_parquet(layout.new_part(0),  # noqa: E731
                                             pa.Table.from_pylist(rows, schema=schema))
    write([_row(0), _row(1)])
    write([_row(1, "invalid_input"), _row(2)])  # row 1 again: a zombie's part slipped in
    stats = checkpoint.mark_done(layout, 0)
    parts = layout.parts_of(0)
    assert len(parts) == 1 and stats.parts == [parts[0].rsplit("/", 1)[-1]]
    table = LOCAL.read_columns(parts[0], ["row_index", "status"]).sort_by("row_index")
    assert table.column("row_index").to_pylist() == [0, 1, 2]  # row 1 once: one copy kept
    write([_row(2)])  # the zombie again, after the shard was done
    assert checkpoint.sweep_orphans(layout, {0: stats}) == 1
    assert layout.parts_of(0) == parts


class CountingStorage(Storage):
    """The real local store, counting listings per folder and leases read."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: Counter[str] = Counter()
        self.leases_read: list[str] = []

    def list_files(self, folder: str, *args, **kwargs) -> list[str]:
        self.listed[folder.rsplit("/", 1)[-1]] += 1
        return super().list_files(folder, *args, **kwargs)

    def list_versions(self, folder: str, *args, **kwargs) -> dict[str, str]:
        self.listed[folder.rsplit("/", 1)[-1]] += 1
        return super().list_versions(folder, *args, **kwargs)

    def read_with_age(self, path: str) -> tuple[bytes, str, float]:
        self.leases_read.append(path.rsplit("/", 1)[-1])
        return super().read_with_age(path)


def test_finalize_lists_data_once_whatever_the_number_of_shards(tmp_path: Path) -> None:
    store = CountingStorage()
    layout = OutputLayout(str(tmp_path / "out"), store)
    write = lambda s, rows: store.write_parquet(layout.new_part(s),  # noqa: E731
                                                pa.Table.from_pylist(rows, schema=output_schema()))
    stats = {}
    for s in range(6):
        write(s, [_row(10 * s), _row(10 * s + 1)])
        stats[s] = checkpoint.mark_done(layout, s)
    write(2, [_row(20)])  # zombies' parts after their shards were done
    write(5, [_row(51)])
    store.listed.clear()
    assert checkpoint.sweep_orphans(layout, stats) == 2
    assert store.listed == {"data": 1}  # one listing for the job, not one per shard
    assert all(len(layout.parts_of(s)) == 1 for s in range(6))
    assert checkpoint.read_markers(layout, [0, 5, 6]) == {0: stats[0], 5: stats[5], 6: None}


def test_a_shards_parts_are_found_with_one_prefix_listing(s3) -> None:
    """On S3 the shard's prefix is the listing's: one request (a page holds 4 keys here)
    whether or not other shards' parts crowd data/."""
    store = Storage(page_size=4)
    layout = OutputLayout(f"s3://{s3.bucket('prefix-listing')}/out", store)
    write = lambda s, rows: store.write_parquet(layout.new_part(s),  # noqa: E731
                                                pa.Table.from_pylist(rows, schema=output_schema()))
    listings: list[int] = []
    store._s3.client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda parsed, **_: listings.append(parsed["KeyCount"]))

    def lookup() -> tuple[set, list[int]]:
        listings.clear()
        return checkpoint.committed_keys(layout, 7), list(listings)

    write(7, [_row(0), _row(1)])
    write(7, [_row(2)])
    alone = lookup()
    for s in (0, 6, 8, 70, 700, 7000, *range(100, 110)):  # 70, 700, 7000 share digits with 7
        write(s, [_row(s)])
    assert lookup() == alone == ({(0, 0), (1, 0), (2, 0)}, [2])
