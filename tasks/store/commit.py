"""Buffering finished rows and committing them as Parquet parts on a writer thread,
so generation never waits for storage. A part is written atomically; a shard's done
marker is written only after all of its parts. A rollout's open conversations are saved
on the same thread, fenced the same way (store/open_conversations.py).

The driver hands the writer its jobs without waiting for them: one slow request (a
claim renewal, a part's PUT, a progress artifact the commit callback updates) must not
keep it from polling the engine, or finished rows sit in an engine that looks full to
it. It waits only when the writer has fallen `max_behind_rows` rows behind (two
flushes' worth by default), so memory stays bounded when storage cannot keep up. A flush
due by time alone waits until the previous timed flush is written (not for an idle
writer: shards that end keep it busy), so slow storage gets fewer, larger parts instead
of a growing queue of small ones."""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from thinkbatch.schemas.manifest import EngineLayout, ShardStats
from thinkbatch.tasks.store import checkpoint, open_conversations
from thinkbatch.tasks.store.layout import OutputLayout

OnShardDone = Callable[[int, ShardStats], None]
OnCommit = Callable[[int, int], None]


class FencedOut(RuntimeError):
    """This worker no longer holds the shard's claim: committing would duplicate rows.
    Only that shard is given up (`on_lost`); the worker's other shards go on."""


class Committer:
    def __init__(self, layout: OutputLayout, schema: pa.Schema, *, flush_rows: int,
                 flush_seconds: float, compression: str, on_shard_done: OnShardDone,
                 may_commit: Callable[[int], bool], on_commit: OnCommit | None = None,
                 on_lost: Callable[[int, FencedOut], None] | None = None,
                 save_seconds: float | None = None, max_behind_rows: int | None = None):
        self.layout = layout
        self.schema = schema
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.compression = compression
        self.on_shard_done = on_shard_done
        self.on_commit = on_commit
        self.may_commit = may_commit
        self.on_lost = on_lost  # a shard whose claim was lost, told once (writer thread)
        self._lost: set[int] = set()
        self.engine: EngineLayout | None = None  # what generates the rows: for the markers
        self._buffer: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self._buffered = 0
        self._last_flush = time.monotonic()
        # shard -> part name -> Unix time of its commit, and what the marker needs of it
        # (checkpoint.PartSummary): for the shard's marker (writer thread)
        self._committed_at: dict[int, dict[str, float]] = defaultdict(dict)
        self._summaries: dict[int, dict[str, checkpoint.PartSummary]] = defaultdict(dict)
        # Open conversations (None: not saved, a single-turn job): the latest state of each
        # not yet written, per shard, written once `save_seconds` passed (driver thread);
        # those written, whose files go once their rows are committed (writer thread).
        self.save_seconds = save_seconds
        self._states: dict[int, dict[tuple[int, int], bytes]] = defaultdict(dict)
        self._last_save = time.monotonic()
        self._saved: dict[int, set[tuple[int, int]]] = defaultdict(set)
        # Jobs queued for the writer, each with its rows (a state saved counts as one);
        # the producer waits only once they exceed `max_behind_rows` (module docstring).
        self._jobs: queue.Queue[tuple[Callable[[], None], int] | None] = queue.Queue()
        self.max_behind_rows = max_behind_rows or 2 * flush_rows
        self._behind = 0
        self._caught_up = threading.Condition()
        self._queued = self._written = 0  # jobs queued and written so far
        self._timed = 0  # the job count a timed flush waits to see written
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="thinkbatch-writer", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        return self._buffered

    def add(self, shard_id: int, row: dict[str, Any]) -> None:
        if shard_id in self._lost:
            return
        self._buffer[shard_id].append(row)
        self._buffered += 1

    def save(self, shard_id: int, key: tuple[int, int], state: bytes,
             saved: Callable[[], None] | None = None) -> None:
        """An open conversation's state at a turn boundary, replacing any not yet written:
        written with the others once `save_seconds` passed (maybe_flush). With `saved`,
        written now, alone, and `saved` called once it is (on the writer thread; also
        when it is not written: the shard is lost, or the write failed and the job
        fails), so the conversation can wait for it."""
        if self.save_seconds is None or shard_id in self._lost:
            if saved is not None:
                saved()
            return
        if saved is None:
            self._states[shard_id][key] = state
            return
        self._states[shard_id].pop(key, None)  # superseded
        try:
            self._put(lambda: self._write_states(shard_id, {key: state}, saved))
        except BaseException:
            saved()
            raise

    def maybe_flush(self) -> None:
        self.raise_if_failed()
        if (self._states and time.monotonic() - self._last_save >= (self.save_seconds or 0)):
            self._flush_states()
        due = (time.monotonic() - self._last_flush >= self.flush_seconds
               and self._written >= self._timed)
        if self._buffered >= self.flush_rows or (due and self._buffered):
            for shard_id in list(self._buffer):
                self._flush_shard(shard_id)
            self._last_flush = time.monotonic()
            self._timed = self._queued

    def flush(self) -> None:
        """Commit every buffered row and open conversation now: a clean stop keeps what
        was generated."""
        self._flush_states()
        for shard_id in list(self._buffer):
            self._flush_shard(shard_id)

    def finish_shard(self, shard_id: int) -> None:
        """All rows of the shard have been added: commit them, then mark it done."""
        self._flush_shard(shard_id)
        self._put(lambda: self._done(shard_id))

    def add_part(self, shard_id: int, table: pa.Table) -> None:
        """Commit a ready table as one part (a retry's carried rows), in order with the
        shard's other parts and fenced like them; any thread may call it."""
        self._put(lambda: self._commit(shard_id, table))

    def _flush_states(self) -> None:
        """Queue the open conversations' states, one job per shard (driver thread)."""
        states, self._states = self._states, defaultdict(dict)
        self._last_save = time.monotonic()
        for shard_id, of_shard in states.items():
            if of_shard and shard_id not in self._lost:
                self._put(lambda s=shard_id, o=of_shard: self._write_states(s, o),
                          len(of_shard))

    def _write_states(self, shard_id: int, states: dict[tuple[int, int], bytes],
                      saved: Callable[[], None] | None = None) -> None:
        try:
            if shard_id in self._lost:
                return
            if not self.may_commit(shard_id):
                return self._give_up(shard_id, "not saving its open conversations")
            open_conversations.write(self.layout, shard_id, states)
            self._saved[shard_id].update(states)
        finally:
            if saved is not None:
                saved()

    def _done(self, shard_id: int) -> None:
        if shard_id in self._lost:
            return
        if not self.may_commit(shard_id):
            return self._give_up(shard_id, "not marking it done")
        self.on_shard_done(shard_id, checkpoint.mark_done(
            self.layout, shard_id, self.compression, self._committed_at.pop(shard_id, None),
            self.engine, self._summaries.pop(shard_id, None)))
        if self.save_seconds is not None:  # what a kill or another run left of the shard
            self._saved.pop(shard_id, None)
            open_conversations.sweep(self.layout, shard_id)

    def _flush_shard(self, shard_id: int) -> None:
        rows = self._buffer.pop(shard_id, None)
        if not rows:
            return
        self._buffered -= len(rows)
        if shard_id in self._lost:
            return
        # A conversation that ended keeps its last state until its row is in a part: a
        # kill before the part resumes it from its last tool call, not an earlier save
        # (which would run that call again). Written ahead of the part, deleted after it.
        pending = self._states.get(shard_id, {})
        last = {k: pending.pop(k) for k in [(r["row_index"], r["sample_index"]) for r in rows]
                if k in pending}
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self._put(lambda: self._commit(shard_id, table, last), len(rows))

    def _commit(self, shard_id: int, table: pa.Table,
                states: dict[tuple[int, int], bytes] | None = None) -> None:
        """One fenced write: the ended conversations' last `states` first, then the part."""
        if shard_id in self._lost:
            return
        if not self.may_commit(shard_id):
            return self._give_up(shard_id, "not committing")
        if states:
            open_conversations.write(self.layout, shard_id, states)
            self._saved[shard_id].update(states)
        part = self.layout.new_part(shard_id)
        self.layout.store.write_parquet(part, table, self.compression)
        name = part.rsplit("/", 1)[-1]
        self._committed_at[shard_id][name] = time.time()
        self._summaries[shard_id][name] = checkpoint.PartSummary.of_table(table)
        if saved := self._saved.get(shard_id):
            ended = saved & set(zip(table.column("row_index").to_pylist(),
                                    table.column("sample_index").to_pylist()))
            saved -= ended
            open_conversations.forget(self.layout, shard_id, ended)
        if self.on_commit:
            self.on_commit(shard_id, table.num_rows)

    def _give_up(self, shard_id: int, what: str) -> None:
        """Another worker took the shard over: nothing more of it is written here. Without
        `on_lost` the whole committer fails (a run holding the output's only lease)."""
        error = FencedOut(f"lost the claim on shard {shard_id}; {what}")
        if self.on_lost is None:
            raise error
        self._lost.add(shard_id)
        self._committed_at.pop(shard_id, None)
        self._summaries.pop(shard_id, None)
        self._saved.pop(shard_id, None)
        self.on_lost(shard_id, error)

    def _put(self, job: Callable[[], None], rows: int = 0) -> None:
        with self._caught_up:
            while self._behind and self._behind + rows > self.max_behind_rows:
                self.raise_if_failed()
                self._caught_up.wait(0.5)
            self._behind += rows
            self._queued += 1
        self._jobs.put((job, rows))

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, rows = item
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # surfaced to the producer on its next call
                    self._error = e
            with self._caught_up:
                self._behind -= rows
                self._written += 1
                self._caught_up.notify_all()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"committing output failed: {self._error}") from self._error

    def close(self) -> None:
        """Wait for every queued commit; buffered rows not yet flushed are not written."""
        self._jobs.put(None)
        self._thread.join()
        self.raise_if_failed()
