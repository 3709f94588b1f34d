"""The committer's hand-off: the driver thread never waits for storage, until the writer
has fallen a bounded number of rows behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa

from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.commit import Committer
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


def _row(i: int) -> dict:
    return {"id": f"r{i}", "row_index": i, "sample_index": 0, "status": "ok",
            "prompt_tokens": 3, "completion_tokens": 5}


def _stuck_committer(tmp_path: Path, release: threading.Event, **kw) -> tuple[Committer,
                                                                         dict[int, ShardStats]]:
    """A committer whose every fenced write waits for `release` (a renewal that hangs)."""
    done: dict[int, ShardStats] = {}
    c = Committer(OutputLayout(str(tmp_path / "out"), Storage()), output_schema(),
                  flush_rows=100, flush_seconds=60, compression="zstd",
                  on_shard_done=lambda s, stats: done.__setitem__(s, stats),
                  may_commit=lambda shard_id: release.wait(30), **kw)
    return c, done


def _in_thread(work) -> threading.Thread:
    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def test_a_slow_writer_does_not_hold_up_the_driver(tmp_path: Path) -> None:
    release = threading.Event()
    c, done = _stuck_committer(tmp_path, release)

    def driver() -> None:  # 20 shards of one row each end while the writer is stuck
        for shard in range(20):
            c.add(shard, _row(shard))
            c.finish_shard(shard)

    t = _in_thread(driver)
    t.join(5)
    assert not t.is_alive(), "the driver waited for a stuck writer"
    assert not done  # nothing was written meanwhile
    release.set()
    c.close()
    assert sorted(done) == list(range(20))
    assert all(checkpoint.committed_keys(c.layout, s) == {(s, 0)} for s in range(20))


def test_the_driver_waits_once_the_writer_is_too_far_behind(tmp_path: Path) -> None:
    release = threading.Event()
    c, done = _stuck_committer(tmp_path, release, max_behind_rows=3)

    def driver() -> None:
        for shard in range(5):
            c.add(shard, _row(shard))
            c.finish_shard(shard)

    t = _in_thread(driver)
    t.join(1)
    assert t.is_alive(), "rows queued past max_behind_rows without waiting"
    release.set()
    t.join(10)
    assert not t.is_alive()
    c.close()
    assert sorted(done) == list(range(5))


def test_a_timed_flush_waits_for_the_writer_and_commits_larger_parts(tmp_path: Path) -> None:
    """flush_seconds=0: every call is due. While the first part is stuck in the writer,
    later rows stay buffered (no queue of one-row parts), and go as one part after it."""
    release = threading.Event()
    done: dict[int, ShardStats] = {}
    layout = OutputLayout(str(tmp_path / "out"), Storage())
    c = Committer(layout, output_schema(), flush_rows=100, flush_seconds=0, compression="zstd",
                  on_shard_done=lambda s, stats: done.__setitem__(s, stats),
                  may_commit=lambda shard_id: release.wait(30))
    for i in range(6):
        c.add(0, _row(i))
        c.maybe_flush()
    assert c.buffered == 5  # row 0 went to the stuck writer; rows 1-5 wait for it
    release.set()
    c.finish_shard(0)
    c.close()
    assert done[0].rows == 6 and len(layout.parts_of(0)) == 2


def test_a_writer_busy_with_other_shards_does_not_starve_timed_flushes(
        tmp_path: Path) -> None:
    """Shard 5's commit hangs in the writer; shard 0's rows still go out on time, queued
    behind it: a timed flush waits for the previous timed flush, not for an idle writer."""
    release = threading.Event()
    layout = OutputLayout(str(tmp_path / "out"), Storage())
    c = Committer(layout, output_schema(), flush_rows=100, flush_seconds=0, compression="zstd",
                  on_shard_done=lambda s, stats: None,
                  may_commit=lambda shard_id: shard_id != 5 or release.wait(30))
    c.add(0, _row(0))
    c.maybe_flush()
    deadline = time.monotonic() + 10
    while not checkpoint.committed_keys(layout, 0) and time.monotonic() < deadline:
        time.sleep(0.01)  # the first timed flush is written
    c.add(5, _row(5))
    c.finish_shard(5)  # stuck in the writer from here on
    c.add(0, _row(1))
    c.maybe_flush()
    assert c.buffered == 0
    release.set()
    c.close()
    assert checkpoint.committed_keys(layout, 0) == {(0, 0), (1, 0)}


class _ReadCounting(Storage):
    """The local store, counting the parts it opens for reading."""

    def __init__(self) -> None:
        super().__init__()
        self.parts_read: list[str] = []

    def open_parquet(self, path: str):
        self.parts_read.append(path.rsplit("/", 1)[-1])
        return super().open_parquet(path)

    def read_columns(self, path: str, columns: list[str]):
        self.parts_read.append(path.rsplit("/", 1)[-1])
        return super().read_columns(path, columns)


def test_marking_a_shard_done_reads_only_the_parts_another_process_wrote(
        tmp_path: Path) -> None:
    """A shard of slow rows is committed a row at a time: its marker is summed from what
    the committer wrote, and only a part left by an earlier run is read back, once."""
    store = _ReadCounting()
    layout = OutputLayout(str(tmp_path / "out"), store)
    earlier = layout.new_part(0)
    store.write_parquet(earlier, pa.Table.from_pylist(
        [{**_row(9), "status": "truncated", "completion_tokens": 7}], schema=output_schema()))
    done: dict[int, ShardStats] = {}
    c = Committer(layout, output_schema(), flush_rows=1, flush_seconds=60, compression="zstd",
                  on_shard_done=lambda s, stats: done.__setitem__(s, stats),
                  may_commit=lambda shard_id: True)
    for i in range(5):
        c.add(0, _row(i))
        c.maybe_flush()
    c.finish_shard(0)
    c.close()
    assert store.parts_read == [earlier.rsplit("/", 1)[-1]]
    assert done[0].rows == 6 and done[0].status == {"ok": 5, "truncated": 1}
    assert done[0].completion_tokens == 5 * 5 + 7 and len(done[0].parts) == 6
    assert checkpoint.done_stats(layout, 0) == done[0]
