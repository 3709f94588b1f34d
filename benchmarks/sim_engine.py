"""A simulated engine at a GPU node's timings, behind thinkbatch's `Engine` protocol.

The fleet simulation (fleet_sim.py) runs the real worker loop against it: rows finish
after times drawn from a heavy-tailed length distribution at a per-slot decode rate, the
engine loads for minutes, and the number of rows it decodes at once follows a KV cache
budget. Time is simulated and scaled down: `SimClock` turns wall time into simulated
seconds (e.g. 1 simulated hour = 4 s), so hours-long rows take seconds here.

The model, per engine (one GPU node):
- slots S = KV tokens / tokens per row (the recipe's 5,721,088 KV tokens with DCP8 and a
  25k-token row: 228). Decode throughput is S slots at `s_per_token` each (the recipe's
  ~0.4 s per token per request under load): n decoding rows each advance at
  min(1, S/n) / s_per_token tokens per second, so more rows than slots take longer
  each and add nothing, and fewer leave slots idle. Slot use is min(n, S) / S.
  With `s_per_token_alone`, fewer rows than slots also decode faster each (the step
  shortens with the batch), which only an emptying engine sees: the drain at the end.
- admission as vLLM's scheduler does it: up to `max_num_seqs` rows run, a waiting row
  enters when the KV cache has room for its prompt and the tokens it generated before
  (minus a watermark), and prefills first.
- preemption as vLLM v1 does it: when growing rows overflow the KV cache, the newest
  running row loses its KV cache and goes back to the head of the queue, keeping its
  generated tokens, which it prefills again when it re-enters (counted as recomputed).
- a row's lengths are a function of its row index (`Lengths`), as a seeded row is: a
  row regenerated elsewhere takes as long again.

What it records (one JSON object a line, `Recorder`): the load, each row submitted,
started, preempted, finished and aborted, and slot use sampled over simulated time with the
exact integral of busy slots, so utilization over any window is exact.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from thinkbatch.schemas.manifest import EngineLayout
from thinkbatch.schemas.record import Generation, RowRequest

TOKENS_TOL = 1e-4  # float error allowed when a row's tokens or the KV cache reach a bound
TIME_TOL = 1e-6


@dataclass(frozen=True)
class SimModel:
    """One simulated GPU node: its KV budget, speed, load time and the rows' lengths."""

    kv_tokens: int = 5_721_088  # the Kimi-K2-Thinking recipe on 8xH200, TP8 + DCP8
    tokens_per_row: int = 25_000  # prompt + output a slot is sized for
    s_per_token: float = 0.4  # decode time per token per request, under load
    # A row decoding alone (None: every row at s_per_token however few decode). A real
    # engine's step shortens as its batch empties; with this set, the step grows linearly
    # from it at one decoding row to s_per_token at S (a variant: the tail's sensitivity).
    s_per_token_alone: float | None = None
    max_num_seqs: int = 1024  # vLLM's default for the LLM class on H100/H200
    prefill_tokens_per_s: float = 10_000.0  # a (re-)prefill's speed, per request
    watermark: float = 0.01  # share of the KV cache kept free when admitting
    load_s: tuple[float, float] = (600.0, 1200.0)  # model load, drawn per engine
    output_median: float = 20_000.0
    output_sigma: float = 0.6
    prompt_median: float = 1_500.0
    prompt_sigma: float = 0.5
    max_tokens: int = 131_072  # the preset's sampling.max_tokens: longer rows are cut
    seed: int = 24

    @property
    def slots(self) -> int:
        return max(self.kv_tokens // self.tokens_per_row, 1)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "slots": self.slots}


class Lengths:
    """(prompt tokens, output tokens, cut at max_tokens) of every row of a job, drawn
    once from the model's log-normal distributions: the same in every process."""

    def __init__(self, model: SimModel, rows: int):
        rng = np.random.default_rng(model.seed)
        out = rng.lognormal(math.log(model.output_median), model.output_sigma, rows)
        prompt = rng.lognormal(math.log(model.prompt_median), model.prompt_sigma, rows)
        self.output = np.minimum(np.maximum(out, 1), model.max_tokens).astype(np.int64)
        self.cut = out >= model.max_tokens
        self.prompt = np.maximum(prompt, 1).astype(np.int64)

    def __call__(self, row_index: int) -> tuple[int, int, bool]:
        return (int(self.prompt[row_index]), int(self.output[row_index]),
                bool(self.cut[row_index]))


class SimClock:
    """Simulated seconds since `t0` (a Unix time shared by every process of a run), at
    `scale` wall seconds per simulated second."""

    def __init__(self, t0: float, scale: float):
        self.t0, self.scale = t0, scale

    def now(self) -> float:
        return (time.time() - self.t0) / self.scale

    def sleep(self, sim_s: float) -> None:
        time.sleep(max(sim_s, 0.0) * self.scale)


class Recorder:
    """Events as JSON lines appended to a file, written in one `write` per flush (an
    O_APPEND file: a SIGKILL loses only what was not flushed yet)."""

    def __init__(self, path: str | os.PathLike[str] | None):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self._lines: list[str] = []

    def __call__(self, **event: Any) -> None:
        if self._fd is not None:
            self._lines.append(json.dumps(event, separators=(",", ":")))

    def flush(self) -> None:
        if self._fd is not None and self._lines:
            os.write(self._fd, ("\n".join(self._lines) + "\n").encode())
            self._lines.clear()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(eq=False)
class _Row:
    key: str
    row_index: int
    prompt: int
    target: int  # output tokens it will generate
    cut: bool  # hit max_tokens
    submitted: float
    done: float = 0.0  # tokens generated when it last stopped decoding
    base: float = 0.0  # while decoding: the progress counter's value at its token 0
    ready_at: float = 0.0  # while prefilling: when it starts decoding
    decoding: bool = False
    epoch: int = 0  # bumped when it leaves the running set: older heap entries are stale
    preemptions: int = 0
    started: float | None = None


@dataclass
class SlotUse:
    """Running totals of an engine's slot use, in simulated seconds."""

    busy_slot_s: float = 0.0  # integral of min(decoding rows, S)
    running_s: float = 0.0  # integral of rows running (decoding or prefilling)
    kv_token_s: float = 0.0  # integral of KV tokens in use
    preemptions: int = 0
    recomputed_tokens: int = 0
    finished: int = 0
    output_tokens: int = 0


class SimEngine:
    """The `Engine` protocol (tasks/rows/engine.py) over the model above. `poll` blocks like
    vLLM's `step()`: until the next row finishes, at most `step_s` simulated seconds."""

    def __init__(self, model: SimModel, lengths: Callable[[int], tuple[int, int, bool]],
                 clock: SimClock, name: str = "sim", record: Recorder | None = None,
                 step_s: float = 45.0, sample_s: float = 300.0):
        self.model = model
        self.name = name  # written as each row's answer: which engine generated it
        self.tokenizer = None
        self.max_model_len: int | None = None  # no prompt is rendered
        self.slots = model.slots
        self.layout = EngineLayout(
            vllm="simulated", device="sim", tensor_parallel_size=8,
            decode_context_parallel_size=8 if model.kv_tokens > 1_000_000 else 1,
            pipeline_parallel_size=1, attention_backend="simulated", dtype="bfloat16",
            kv_cache_dtype="auto", block_size=64, kv_cache_tokens=model.kv_tokens,
            chunked_prefill=True, prefix_caching=True)
        self._lengths = lengths
        self._clock = clock
        self._record = record or Recorder(None)
        self._step_s = step_s
        self._sample_s = sample_s
        self._rate_full = 1.0 / model.s_per_token
        self._room = model.kv_tokens * (1.0 - model.watermark)
        self.use = SlotUse()
        self._waiting: deque[_Row] = deque()
        self._running: OrderedDict[str, _Row] = OrderedDict()  # in order of admission
        self._done: list[Generation] = []
        self._finish_heap: list[tuple[float, int, int, _Row]] = []  # (progress at end, ...)
        self._ready_heap: list[tuple[float, int, int, _Row]] = []  # (time, ...)
        self._seq = 0
        self._progress = 0.0  # tokens each decoding row has gained since the start
        self._kv_fixed = 0.0  # KV tokens in use = _kv_fixed + decoding * _progress
        self._decoding = 0
        self._t = clock.now()
        self._next_sample = self._t
        self._closed = False

    # -- the Engine protocol ----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._running) + len(self._done)

    def guard(self, markers: Iterable[str]) -> None:
        """Nothing is tokenized."""

    def render(self, req: RowRequest, prev: Any) -> None:
        """Nothing is rendered."""

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        self._advance(self._clock.now())
        prompt, output, cut = self._lengths(req.row_index)
        self._waiting.append(_Row(key, req.row_index, prompt, output, cut, self._t))
        self._record(e="sub", t=round(self._t, 1), k=key)
        self._admit()

    def poll(self) -> list[Generation]:
        if not self.in_flight:
            return []
        self._advance(self._clock.now())
        if not self._done:
            self._clock.sleep(min(self._next_event() - self._t, self._step_s))
            self._advance(self._clock.now())
        done, self._done = self._done, []
        self._record.flush()
        return done

    def abort(self, keys: Iterable[str]) -> None:
        """Rows of a shard whose claim was lost leave the engine, their KV cache freed."""
        drop = set(keys)
        self._advance(self._clock.now())
        for key in sorted(drop):
            self._record(e="abort", t=round(self._t, 1), k=key)
        self._waiting = deque(r for r in self._waiting if r.key not in drop)
        for key in drop & self._running.keys():
            self._leave(self._running[key])
        self._done = [g for g in self._done if g.key not in drop]
        self._admit()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._advance(self._clock.now())
            self._sample()
            self._record(e="closed", t=round(self._t, 1), in_flight=self.in_flight)
            self._record.flush()

    # -- the model ----------------------------------------------------------------------

    @property
    def kv_used(self) -> float:
        return self._kv_fixed + self._decoding * self._progress

    def _rate(self) -> float:
        """Tokens per simulated second of each decoding row."""
        n = self._decoding
        if not n:
            return 0.0
        alone, full = self.model.s_per_token_alone, self.model.s_per_token
        if alone is None or n >= self.slots:
            return self._rate_full * min(1.0, self.slots / n)
        return 1.0 / (alone + (full - alone) * (n - 1) / max(self.slots - 1, 1))

    def _push(self, heap: list, at: float, row: _Row) -> None:
        self._seq += 1
        heapq.heappush(heap, (at, self._seq, row.epoch, row))

    @staticmethod
    def _top(heap: list) -> tuple[float, _Row] | None:
        while heap and heap[0][2] != heap[0][3].epoch:
            heapq.heappop(heap)
        return (heap[0][0], heap[0][3]) if heap else None

    def _next_event(self) -> float:
        """The simulated time of the next change: a row that finishes, a prefill that
        ends, the KV cache that overflows, a sample that is due."""
        times = [self._next_sample]
        if (ready := self._top(self._ready_heap)) is not None:
            times.append(ready[0])
        rate = self._rate()
        if rate:
            if (first := self._top(self._finish_heap)) is not None:
                times.append(self._t + max(first[0] - self._progress, 0.0) / rate)
            over = self.model.kv_tokens - self.kv_used
            times.append(self._t + max(over, 0.0) / (self._decoding * rate))
        return min(times)

    def _advance(self, until: float) -> None:
        while True:
            at = min(self._next_event(), until)
            dt = at - self._t
            if dt > 0:
                rate = self._rate()
                self.use.busy_slot_s += min(self._decoding, self.slots) * dt
                self.use.running_s += len(self._running) * dt
                self.use.kv_token_s += (self.kv_used + 0.5 * self._decoding * rate * dt) * dt
                self._progress += rate * dt
                self._t = at
            self._events()
            if self._t >= until - TIME_TOL:
                return

    def _events(self) -> None:
        changed = False
        while (ready := self._top(self._ready_heap)) is not None and \
                ready[0] <= self._t + TIME_TOL:
            heapq.heappop(self._ready_heap)
            self._start_decoding(ready[1])
        while (first := self._top(self._finish_heap)) is not None and \
                first[0] <= self._progress + TOKENS_TOL:
            heapq.heappop(self._finish_heap)
            self._finish(first[1])
            changed = True
        while self.kv_used >= self.model.kv_tokens - TOKENS_TOL and self._running:
            self._preempt()
        if changed:
            self._admit()
        if self._t >= self._next_sample - TIME_TOL:
            self._sample()
            self._next_sample = self._t + self._sample_s

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.model.max_num_seqs:
            row = self._waiting[0]
            need = row.prompt + row.done
            if self.kv_used + need > self._room and self._running:
                return
            self._waiting.popleft()
            self._running[row.key] = row
            self._kv_fixed += need
            row.ready_at = self._t + need / self.model.prefill_tokens_per_s
            if row.started is None:
                row.started = self._t
                self._record(e="start", t=round(self._t, 1), k=row.key)
            self._push(self._ready_heap, row.ready_at, row)

    def _start_decoding(self, row: _Row) -> None:
        self._kv_fixed -= row.prompt + row.done
        row.base = self._progress - row.done
        self._kv_fixed += row.prompt - row.base
        row.decoding = True
        self._decoding += 1
        self._push(self._finish_heap, row.base + row.target, row)

    def _leave(self, row: _Row) -> None:
        """Out of the running set: its KV cache freed, its heap entries stale."""
        del self._running[row.key]
        row.epoch += 1
        if row.decoding:
            row.done = self._progress - row.base
            self._kv_fixed -= row.prompt - row.base
            self._decoding -= 1
            row.decoding = False
        else:
            self._kv_fixed -= row.prompt + row.done

    def _finish(self, row: _Row) -> None:
        self._leave(row)
        self.use.finished += 1
        self.use.output_tokens += row.target
        latency = self._t - row.submitted
        self._done.append(Generation(
            key=row.key, text=self.name, token_ids=range(row.target),
            finish_reason="length" if row.cut else "stop",
            prompt_token_ids=range(row.prompt),
            ttft_s=(row.started or row.submitted) - row.submitted, latency_s=latency))
        self._record(e="fin", t=round(self._t, 1), k=row.key, tokens=row.target,
                     pre=row.preemptions)

    def _preempt(self) -> None:
        """vLLM v1: the newest running row gives its KV cache back and waits at the
        head of the queue; it keeps its tokens and prefills them again."""
        row = next(reversed(self._running.values()))
        self._leave(row)
        row.preemptions += 1
        self.use.preemptions += 1
        self.use.recomputed_tokens += int(row.prompt + row.done)
        self._waiting.appendleft(row)
        self._record(e="pre", t=round(self._t, 1), k=row.key, done=int(row.done))

    def _sample(self) -> None:
        self._record(e="use", t=round(self._t, 1), dec=self._decoding, run=len(self._running),
                     wait=len(self._waiting), kv=int(self.kv_used),
                     busy=round(self.use.busy_slot_s, 1), pre=self.use.preemptions)


@dataclass
class Loading:
    """How a simulated engine loads: the model's load time, drawn per engine, slept on
    the simulated clock; the load is recorded before and after."""

    model: SimModel
    clock: SimClock
    record: Recorder
    seed: int = 0
    loads: list[float] = field(default_factory=list)

    def __call__(self) -> None:
        rng = np.random.default_rng([self.model.seed, self.seed, len(self.loads)])
        load_s = float(rng.uniform(*self.model.load_s))
        self.loads.append(load_s)
        self.record(e="load", t=round(self.clock.now(), 1), load_s=round(load_s, 1))
        self.record.flush()
        self.clock.sleep(load_s)
        self.record(e="loaded", t=round(self.clock.now(), 1), slots=self.model.slots,
                    kv_tokens=self.model.kv_tokens)
        self.record.flush()
