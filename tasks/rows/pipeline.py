"""The continuous loop: one engine, fed from a queue of shards, with no barrier.

A feeder thread reads and renders rows of the queued shards ahead of time (skipping
rows already committed); the driver thread keeps up to its in-flight limit of requests in
the engine, parses what finishes and hands rows to the committer. Shards only exist
for bookkeeping: requests of the next shard enter while the last ones of the
previous shard still generate. Every row is a conversation (rows/conversation.py): a
single-turn job's of one turn, a rollout's of several, whose next turns enter ahead of
new rows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.plan import Plan, Shard
from thinkbatch.schemas.record import Generation, Parsed, output_row
from thinkbatch.tasks.rows.conversation import Conversation, Conversations
from thinkbatch.tasks.rows.engine import Engine, EngineDied, RequestRejected
from thinkbatch.tasks.rows.in_flight import Backlog, InFlight
from thinkbatch.tasks.rows.listeners import Listener
from thinkbatch.tasks.rows.parse import OutputParser
from thinkbatch.tasks.rows.read import shard_batches
from thinkbatch.tasks.rows.render import Renderer, needed_columns
from thinkbatch.tasks.rows.sampling import SamplingBuilder, SamplingRejected
from thinkbatch.tasks.rows.triage import Triage
from thinkbatch.tasks.store import checkpoint, open_conversations
from thinkbatch.tasks.store.commit import Committer, FencedOut
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.tools.toolbox import Toolbox

log = logging.getLogger("thinkbatch.pipeline")

STOP_GRACE_S = 2.0  # how long an error waits for a stop before failing the shards
TOOLS_WAIT_S = 0.2  # how long an idle engine's driver blocks for tool results at once


class Carry(Protocol):
    """A retry's rows kept from its source (jobs/retry.py), committed by the feeder."""

    def keep(self, shard_id: int, done: set[tuple[int, int]],
             committer: Committer) -> tuple[set[tuple[int, int]], int]: ...


def _kv_tokens(engine: Engine) -> int | None:
    return engine.layout.kv_cache_tokens if engine.layout is not None else None


@dataclass(slots=True)
class _ShardStart:
    shard_id: int
    pending: int


class Pipeline:
    def __init__(self, job: JobSpec, plan: Plan, layout: OutputLayout, engine: Engine,
                 parser: OutputParser, schema: Any, listeners: Listener,
                 may_commit: Callable[[int], bool],
                 restart_engine: Callable[[Engine], Engine] | None = None,
                 toolbox: Toolbox | None = None, carry: Carry | None = None,
                 worker: str | None = None):
        self.job = job
        self.worker = worker  # the process's name its rows carry (their `worker` column)
        self.plan = plan
        self.engine = engine
        self._restart_engine = restart_engine
        self.restarts = 0  # engines that died under this pipeline and were replaced
        self.turns_capped = 0  # turns whose max_tokens was cut to the room left (engine.py)
        self.triage = Triage(job.engine.max_restarts if restart_engine else 0)
        self.parser = parser
        self.toolbox = toolbox  # a rollout job's tools: closed when the pipeline ends
        self.conversations = Conversations(job, parser, toolbox,
                                           lambda req, prev: self.engine.render(req, prev),
                                           lambda: self.engine.max_model_len)
        self.sampling = SamplingBuilder(job) if job.engine.kind == "vllm" else None
        self.renderer = Renderer(job)
        self.listeners = listeners  # what watches the rows (rows/listeners.py)
        self.committer = Committer(
            layout, schema, flush_rows=job.output.flush_rows,
            flush_seconds=job.output.flush_seconds, compression=job.output.compression,
            on_shard_done=self._shard_done, on_commit=self._committed, may_commit=may_commit,
            on_lost=self._claim_lost,
            save_seconds=(job.rollout.checkpoint_seconds if job.rollout is not None else None),
        )
        self.committer.engine = engine.layout
        self.in_flight_limit = InFlight(job.engine.max_in_flight, _kv_tokens(engine),
                                        job.sampling.max_tokens,
                                        job.engine.expected_tokens_per_row)
        self.backlog = Backlog()
        self.layout = layout
        self.carry = carry  # a retry's rows kept from its source
        self._shards: queue.Queue[Shard | None] = queue.Queue()
        self._futures: dict[int, Future[ShardStats]] = {}
        self._claim_s: dict[int, float] = {}  # how long each shard's claim took
        self._items: queue.Queue[Any] = queue.Queue(maxsize=4)  # rendered batches, bounded
        self._remaining: dict[int, int] = {}
        self._inflight: dict[str, Conversation] = {}
        self._held: dict[str, Conversation] = {}  # out of the engine while triaged
        self._lost: set[int] = set()  # shards another worker took over (writer thread)
        self._dropped: set[int] = set()  # lost shards whose requests left the engine
        self._stop = threading.Event()
        self._halt = threading.Event()  # stop() on a signal: leave in-flight requests
        self._error: BaseException | None = None
        self.submitted = 0
        self.committed = 0
        self._feeder = threading.Thread(target=self._feed, name="thinkbatch-feeder", daemon=True)
        self._driver = threading.Thread(target=self._drive, name="thinkbatch-driver", daemon=True)
        self._feeder.start()
        self._driver.start()

    # -- public, thread-safe ------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Rows in the engine (a rollout: conversations generating a turn)."""
        return len(self._inflight)

    def submit_shard(self, shard_id: int, asked_at: float | None = None) -> Future[ShardStats]:
        """Queue a shard; the future resolves with its stats once it is committed.
        `asked_at` (time.monotonic) is when its claim was asked for: the claim and the
        read of its first rows are the lead that sizes the backlog (in_flight.Backlog)."""
        fut: Future[ShardStats] = Future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._futures[shard_id] = fut
        self._claim_s[shard_id] = 0.0 if asked_at is None else time.monotonic() - asked_at
        shard = self.plan.shards[shard_id]
        self.backlog.add(shard.num_rows * self.job.sampling.n)
        self._shards.put(shard)
        return fut

    def wants_shard(self) -> bool:
        """Whether the rows not yet in the engine run lower than it starts before another
        shard's rows arrive (at most what it holds at once): time to claim another shard,
        so the engine stays full to the last row and no worker hoards the job's last
        shards (in_flight.Backlog)."""
        return self.backlog.wants_rows(self.in_flight_limit.limit)

    def close(self) -> None:
        """Finish the requests in flight and their commits; a shard left unfinished (the
        worker gave up on an error) has its future cancelled, so nothing waits on it."""
        self._stop.set()
        self._shards.put(None)
        self._driver.join()
        self._feeder.join(timeout=5)
        try:
            self.committer.close()
        finally:
            self._cancel_unfinished()
            self._close_tools()

    def stop(self) -> None:
        """Stop now (a signal): no new requests, those in flight left to a rerun, every
        finished row committed, unfinished shards' futures cancelled. An engine error is
        no reason to fail here (Ctrl-C reaches the engine's processes too); a failed
        commit is."""
        self._halt.set()
        self._stop.set()
        self._shards.put(None)
        self._driver.join()
        self._feeder.join(timeout=5)
        try:
            try:
                self.committer.flush()
            finally:
                self.committer.close()
        finally:
            self._cancel_unfinished()
            self._close_tools()

    def _cancel_unfinished(self) -> None:
        for fut in list(self._futures.values()):
            fut.cancel()

    def _close_tools(self) -> None:
        """Conversations still at their tools are left to a rerun, like requests in flight."""
        if self.toolbox is not None:
            self.toolbox.close()
        self.conversations.close()

    # -- feeder thread --------------------------------------------------------------

    def _feed(self) -> None:
        columns = needed_columns(self.job)
        n = self.job.sampling.n
        try:
            while (shard := self._shards.get()) is not None:
                got = time.monotonic()
                done = checkpoint.committed_keys(self.layout, shard.shard_id)
                self.listeners.done_before(len(done))
                if self.carry is not None:  # a retry: the source's other rows, as they are
                    kept, copied = self.carry.keep(shard.shard_id, done, self.committer)
                    done |= kept
                    self.listeners.done_before(copied)
                self.backlog.add(-len(done))
                saved = (open_conversations.load(self.layout, shard.shard_id, done)
                         if self.conversations.saving else {})
                # The claim and the reads, not the waits for the queue: a lead that counted
                # the backlog ahead of it would keep the backlog long.
                lead: float | None = self._claim_s.pop(shard.shard_id) + time.monotonic() - got
                self._put_item(_ShardStart(shard.shard_id, shard.num_rows * n - len(done)))
                resumed = time.monotonic()
                for batch in shard_batches(self.layout.store, self.plan, shard, columns,
                                           self.job.input.id_column):
                    work = [self.conversations.conversation(shard.shard_id, r, s)
                            for r in map(self.conversations.prepare,
                                         self.renderer.render_batch(batch))
                            for s in ((r.sample_index,) if r.sample_index is not None
                                      else range(n))
                            if (r.row_index, s) not in done]
                    for conv in work:
                        if (state := saved.pop((conv.req.row_index, conv.sample), None)):
                            self.conversations.resume(conv, state)
                    if work:
                        if lead is not None:
                            self.backlog.lead(lead + time.monotonic() - resumed)
                            lead = None
                        self._put_item(work)
        except BaseException as e:
            self._fail(e)

    def _put_item(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- driver thread -------------------------------------------------------------

    def _drive(self) -> None:
        backlog: list[Conversation] = []
        try:
            while not self._halt.is_set() and (not self._stop.is_set() or self._inflight
                                               or self._held
                                               or self.conversations.at_tools):
                if self._error is not None:
                    return
                try:
                    if len(self._lost) > len(self._dropped):
                        self._drop_lost()
                    backlog = self._fill(backlog)
                    for gen in self.engine.poll():
                        self._finish(self._inflight.pop(gen.key), gen)
                    if self.triage.searching and not self._inflight:
                        self._resubmit(self.triage.trial_passed())
                except EngineDied as e:
                    self._replace_engine(e)
                self.committer.maybe_flush()
        except BaseException as e:
            # A stop signal sent to a process group or cgroup (systemd, Slurm) kills the
            # engine's processes too; the worker then calls stop() within STOP_GRACE_S.
            if not self._halt.wait(STOP_GRACE_S):
                self._fail(e)

    def _replace_engine(self, err: EngineDied) -> None:
        """The engine died: load a new one and resubmit, find the row that kills it, or
        fail (tasks/rows/triage.py). The rows in flight are not engine errors unless one
        killed the engine alone. A stop signal to the process group kills the engine
        first: then there is nothing to restart."""
        while True:
            if self._halt.wait(STOP_GRACE_S):
                raise err
            self._held.update(self._inflight)
            in_flight, self._inflight = list(self._inflight), {}
            verdict = self.triage.died(in_flight, str(err),
                                       waiting=len(self._held) - len(in_flight))
            if verdict.stop is not None:  # the rows held are left to a rerun
                raise EngineDied(verdict.stop) from err
            if verdict.blame is not None:
                log.warning("request %s killed the engine running alone (%s): written as "
                            "engine_error", verdict.blame, err)
                self._blame(self._held.pop(verdict.blame), str(err))
            self.restarts += 1
            log.warning("the engine died (%s); loading a new one (restart %d) and "
                        "resubmitting %s", err, self.restarts,
                        f"{len(verdict.run)} of {len(self._held)} rows, looking for one that "
                        "kills it" if verdict.run is not None else f"{len(self._held)} rows")
            try:
                assert self._restart_engine is not None  # else the triage stopped
                self.engine = self._restart_engine(self.engine)
                self.committer.engine = self.engine.layout
                self.in_flight_limit.kv_tokens = _kv_tokens(self.engine)
                self._resubmit(verdict.run)
                return
            except EngineDied as again:
                err = again

    def _resubmit(self, keys: list[str] | None) -> None:
        """Submit the held rows named, or (None) all of them."""
        for key in list(self._held) if keys is None else keys:
            self._submit(self._held.pop(key))

    def _blame(self, conv: Conversation, cause: str) -> None:
        error = f"the engine died each time it ran this request, alone too: {cause}"
        self._emit(conv, self.conversations.rejected(conv, Status.ENGINE_ERROR, error), None)

    def _fill(self, backlog: list[Conversation]) -> list[Conversation]:
        """Top the engine up to its in-flight limit: conversations whose tools returned first,
        then the backlog and the feeder's queue (while fewer than the rollout's limit of
        conversations are open). With nothing to do, wait briefly for the feeder, or for
        tools when some run."""
        conversations = self.conversations
        if self.triage.searching:
            return backlog  # only the suspects on trial run, until the search ends
        while self.engine.in_flight < self.in_flight_limit.limit:
            if (conv := conversations.ready()) is not None:
                if conv.saving:  # its state is written: its next turn is due
                    conv.saving = False
                    self._submit(conv)
                    continue
                self.listeners.tools_returned(conv.turns[-1].results or ())
                if conv.state is not None:  # written on the writer thread (store/commit.py)
                    key = (conv.req.row_index, conv.sample)
                    if conversations.durable:
                        conversations.defer(conv)
                        self.committer.save(conv.shard_id, key, conv.state,
                                            saved=lambda c=conv: conversations.saved(c))
                        conv.state = None
                        continue
                    self.committer.save(conv.shard_id, key, conv.state)
                    conv.state = None
                self._submit(conv)
                continue
            if conversations.full:
                if self.engine.in_flight == 0:
                    conversations.wait(TOOLS_WAIT_S)
                break
            if not backlog:
                idle = self.engine.in_flight == 0
                tools = conversations.at_tools
                item = self._next_item(block=idle and not tools)
                if item is None:
                    if idle and tools:
                        conversations.wait(TOOLS_WAIT_S)
                    break
                if isinstance(item, _ShardStart):
                    self._start_shard(item)
                    continue
                backlog = item[::-1]
            self.backlog.add(-1)
            self._submit(backlog.pop())
        return backlog

    def _next_item(self, block: bool) -> Any:
        try:
            return self._items.get(timeout=0.2) if block else self._items.get_nowait()
        except queue.Empty:
            return None

    def _start_shard(self, start: _ShardStart) -> None:
        if start.shard_id in self._lost:
            return
        self._remaining[start.shard_id] = start.pending
        if start.pending == 0:
            self.committer.finish_shard(start.shard_id)

    def _submit(self, conv: Conversation) -> None:
        if conv.shard_id in self._lost:
            self.conversations.end(conv)
            return
        req = conv.req
        if req.error is not None:
            self._emit(conv, Parsed(req.status, error=req.error), None)
            return
        try:
            params = (self.sampling.for_sample(req.sampling, req.row_index, conv.sample,
                                               turn=len(conv.turns))
                      if self.sampling else None)
        except SamplingRejected as e:  # a row's override that vLLM refuses: this row only
            self._emit(conv, Parsed(Status.INVALID_INPUT, error=str(e)), None)
            return
        try:
            self.engine.submit(conv.key, self.conversations.request(conv), params)
        except EngineDied:
            self._inflight[conv.key] = conv  # resubmitted with the others by a new engine
            raise
        except RequestRejected as e:
            self._emit(conv, self.conversations.rejected(conv, e.status, str(e)), None)
            return
        self._inflight[conv.key] = conv
        self.submitted += 1
        self.listeners.submitted(conv.shard_id, req.row_index, conv.sample,
                                 self.conversations.turn(conv))

    def _finish(self, conv: Conversation, gen: Generation) -> None:
        self.triage.finished()
        self.turns_capped += gen.capped
        if conv.shard_id in self._lost:  # finished before its abort reached the engine
            self.conversations.end(conv)
            return
        self.listeners.finished(conv.shard_id, conv.req.row_index, conv.sample,
                                self.conversations.turn(conv))
        gave_up = None
        if gen.finish_reason in ("abort", "error"):
            gave_up = Parsed(Status.ENGINE_ERROR,
                             error=f"engine finished the request with {gen.finish_reason}")
        parsed = self.conversations.turn_done(conv, gen, gave_up)
        if parsed is None:
            return  # its tools run; its next turn follows when they return
        self._emit(conv, parsed, gen)

    def _emit(self, conv: Conversation, parsed: Parsed, gen: Generation | None) -> None:
        self.backlog.row_done()
        shard_id = conv.shard_id
        trajectory = self.conversations.end(conv)
        if shard_id in self._lost:
            return
        row = output_row(self.job, conv.req, conv.sample, parsed, gen, trajectory, self.worker)
        self.committer.add(shard_id, row)
        self.listeners.row_done(row)
        self._remaining[shard_id] -= 1
        if self._remaining[shard_id] == 0:
            self.committer.finish_shard(shard_id)

    def _drop_lost(self) -> None:
        """Shards another worker took over: their requests leave the engine (its cache
        goes to the shards this worker still holds) and nothing more of them is kept.
        Their rows in the backlog, at tools or held by a triage are dropped as they come
        up for submission."""
        lost = set(self._lost) - self._dropped
        self._dropped |= lost
        gone = [key for key, conv in self._inflight.items() if conv.shard_id in lost]
        for key in gone:
            self.conversations.end(self._inflight.pop(key))
        for shard_id in lost:
            self._remaining.pop(shard_id, None)
        self.engine.abort(gone)
        log.warning("shard(s) %s: their claim was taken over by another worker; %d requests "
                    "aborted, this worker goes on with its other shards",
                    ", ".join(map(str, sorted(lost))), len(gone))

    # -- callbacks from the writer thread ----------------------------------------

    def _claim_lost(self, shard_id: int, error: FencedOut) -> None:
        self._lost.add(shard_id)
        if (fut := self._futures.pop(shard_id, None)) is not None:
            fut.set_exception(error)

    def _committed(self, shard_id: int, rows: int) -> None:
        self.committed += rows
        log.info("committed %d rows of shard %d (run so far: submitted %d, committed %d)",
                 rows, shard_id, self.submitted, self.committed)
        self.listeners.committed(shard_id, rows)

    def _shard_done(self, shard_id: int, stats: ShardStats) -> None:
        self.listeners.shard_done(shard_id, stats)
        self._futures.pop(shard_id).set_result(stats)

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        self._stop.set()
        for fut in list(self._futures.values()):
            if not fut.done():
                fut.set_exception(err)

