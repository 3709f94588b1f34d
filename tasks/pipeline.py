"""The continuous loop: one engine, fed from a queue of shards, with no barrier.

A feeder thread reads and renders rows of the queued shards ahead of time (skipping
rows already committed); the driver thread keeps up to `max_in_flight` requests in
the engine, parses what finishes and hands rows to the committer. Shards only exist
for bookkeeping: requests of the next shard enter while the last ones of the
previous shard still generate.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.plan import Plan, Shard
from thinkbatch.tasks import checkpoint
from thinkbatch.tasks.checkpoint import OutputLayout
from thinkbatch.tasks.commit import Committer
from thinkbatch.tasks.engine import Engine, Generation, RequestRejected
from thinkbatch.tasks.parse import OutputParser, Parsed
from thinkbatch.tasks.read import shard_batches
from thinkbatch.tasks.render import Renderer, RowRequest, needed_columns
from thinkbatch.tasks.sampling import SamplingBuilder
from thinkbatch.tasks.report import Progress

log = logging.getLogger("thinkbatch.pipeline")


@dataclass(slots=True)
class _ShardStart:
    shard_id: int
    pending: int


@dataclass(slots=True)
class _Work:
    """One sample of one row: the unit of exactly-once, keyed (row_index, sample)."""

    shard_id: int
    req: RowRequest
    sample: int

    @property
    def key(self) -> str:
        return f"{self.req.row_index}:{self.sample}"


class Pipeline:
    def __init__(self, job: JobSpec, plan: Plan, layout: OutputLayout, engine: Engine,
                 parser: OutputParser, schema: Any, progress: Progress,
                 may_commit: Callable[[int], bool]):
        self.job = job
        self.plan = plan
        self.engine = engine
        self.parser = parser
        self.sampling = SamplingBuilder(job) if job.engine.kind == "vllm" else None
        self.renderer = Renderer(job)
        self.progress = progress
        self.passthrough = job.input.passthrough_columns
        self.keep_raw = job.output.keep_raw_text
        self.committer = Committer(
            layout, schema, flush_rows=job.output.flush_rows,
            flush_seconds=job.output.flush_seconds, compression=job.output.compression,
            on_shard_done=self._shard_done, on_commit=self._committed, may_commit=may_commit,
        )
        self.layout = layout
        self._shards: queue.Queue[Shard | None] = queue.Queue()
        self._futures: dict[int, Future[dict[str, Any]]] = {}
        self._items: queue.Queue[Any] = queue.Queue(maxsize=4)  # rendered batches, bounded
        self._remaining: dict[int, int] = {}
        self._inflight: dict[str, _Work] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.submitted = 0
        self.committed = 0
        self._feeder = threading.Thread(target=self._feed, name="thinkbatch-feeder", daemon=True)
        self._driver = threading.Thread(target=self._drive, name="thinkbatch-driver", daemon=True)
        self._feeder.start()
        self._driver.start()

    # -- public, thread-safe ------------------------------------------------------

    def submit_shard(self, shard_id: int) -> Future[dict[str, Any]]:
        """Queue a shard; the future resolves with its stats once it is committed."""
        fut: Future[dict[str, Any]] = Future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._futures[shard_id] = fut
        self._shards.put(self.plan.shards[shard_id])
        return fut

    def close(self) -> None:
        self._stop.set()
        self._shards.put(None)
        self._driver.join()
        self._feeder.join(timeout=5)
        self.committer.close()

    # -- feeder thread --------------------------------------------------------------

    def _feed(self) -> None:
        columns = needed_columns(self.job)
        n = self.job.sampling.n
        try:
            while (shard := self._shards.get()) is not None:
                done = checkpoint.committed_keys(self.layout, shard.shard_id)
                self._put_item(_ShardStart(shard.shard_id, shard.num_rows * n - len(done)))
                for batch in shard_batches(self.layout.store, self.plan, shard, columns,
                                           self.job.input.id_column):
                    work = [_Work(shard.shard_id, r, s)
                            for r in self.renderer.render_batch(batch)
                            for s in ((r.sample_index,) if r.sample_index is not None
                                      else range(n))
                            if (r.row_index, s) not in done]
                    if work:
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
        backlog: list[_Work] = []
        try:
            while not self._stop.is_set() or self._inflight:
                if self._error is not None:
                    return
                backlog = self._fill(backlog)
                for gen in self.engine.poll():
                    self._finish(self._inflight.pop(gen.key), gen)
                self.committer.maybe_flush()
        except BaseException as e:
            self._fail(e)

    def _fill(self, backlog: list[_Work]) -> list[_Work]:
        """Top the engine up to max_in_flight from the backlog and the feeder's queue;
        wait briefly for the feeder only when the engine has nothing to do."""
        while self.engine.in_flight < self.job.engine.max_in_flight:
            if not backlog:
                item = self._next_item(block=self.engine.in_flight == 0)
                if item is None:
                    break
                if isinstance(item, _ShardStart):
                    self._start_shard(item)
                    continue
                backlog = item[::-1]
            self._submit(backlog.pop())
        return backlog

    def _next_item(self, block: bool) -> Any:
        try:
            return self._items.get(timeout=0.2) if block else self._items.get_nowait()
        except queue.Empty:
            return None

    def _start_shard(self, start: _ShardStart) -> None:
        self._remaining[start.shard_id] = start.pending
        if start.pending == 0:
            self.committer.finish_shard(start.shard_id)

    def _submit(self, work: _Work) -> None:
        req = work.req
        if req.error is not None:
            self._emit(work, Parsed(Status.INVALID_INPUT, error=req.error), None)
            return
        params = (self.sampling.for_sample(req.sampling, req.row_index, work.sample)
                  if self.sampling else None)
        try:
            self.engine.submit(work.key, req, params)
        except RequestRejected as e:
            self._emit(work, Parsed(e.status, error=str(e)), None)
            return
        self._inflight[work.key] = work
        self.submitted += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("submitted row %d sample %d", req.row_index, work.sample)

    def _finish(self, work: _Work, gen: Generation) -> None:
        req = work.req
        if gen.finish_reason in ("abort", "error"):
            parsed = Parsed(Status.ENGINE_ERROR,
                            error=f"engine finished the request with {gen.finish_reason}")
        else:
            so = (req.sampling or self.job.sampling).structured_outputs
            parsed = self.parser.parse(gen, req.tools, req.chat_template_kwargs,
                                       so.json_schema if so else None)
        self._emit(work, parsed, gen)

    def _emit(self, work: _Work, parsed: Parsed, gen: Generation | None) -> None:
        req, shard_id = work.req, work.shard_id
        keep_raw = gen is not None and (
            self.keep_raw or parsed.status in (Status.PARSE_ERROR, Status.SCHEMA_ERROR))
        row = {
            "id": req.row_id,
            "row_index": req.row_index,
            "sample_index": work.sample,
            **dict(zip(self.passthrough, req.passthrough)),
            "reasoning": parsed.reasoning,
            "answer": parsed.answer,
            "tool_calls": parsed.tool_calls,
            "finish_reason": gen.finish_reason if gen else None,
            "status": parsed.status.value,
            "error": parsed.error,
            "prompt_tokens": len(gen.prompt_token_ids) if gen and gen.prompt_token_ids is not None else None,
            "completion_tokens": len(gen.token_ids) if gen and gen.token_ids else None,
            "reasoning_tokens": parsed.reasoning_tokens,
            "ttft_s": gen.ttft_s if gen else None,
            "latency_s": gen.latency_s if gen else None,
            "raw_text": gen.text if keep_raw else None,
        }
        self.committer.add(shard_id, row)
        self.progress.row_done(row["completion_tokens"] or 0)
        self._remaining[shard_id] -= 1
        if self._remaining[shard_id] == 0:
            self.committer.finish_shard(shard_id)

    # -- callbacks from the writer thread ----------------------------------------

    def _committed(self, shard_id: int, rows: int) -> None:
        self.committed += rows
        log.info("committed %d rows of shard %d (run so far: submitted %d, committed %d)",
                 rows, shard_id, self.submitted, self.committed)

    def _shard_done(self, shard_id: int, stats: dict[str, Any]) -> None:
        self._futures.pop(shard_id).set_result(stats)

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        self._stop.set()
        for fut in list(self._futures.values()):
            if not fut.done():
                fut.set_exception(err)

