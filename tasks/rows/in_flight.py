"""How many requests the engine holds at once: the job's cap, or fewer where the KV cache
would not hold them; and how many rows wait for it (`Backlog`).

Over its KV cache vLLM preempts running requests and recomputes them later: with rows of
10-40k tokens, Kimi-K2-Thinking's preset cap (1024) is several times what its cache holds
(the recipe's logs: 5,721,088 tokens with DCP8, 715,072 with TP8 alone). So the limit is
the KV-cache tokens the loaded engine reports over the tokens a request is expected to
hold: `engine.expected_tokens_per_row` where the job sets it, else `sampling.max_tokens`
(nothing is ever preempted). Not the mean of finished requests: the first to finish are
the short ones, and a limit raised on them over-fills the cache with the long ones (the
fleet simulation, benchmarks/fleet_sim.py, preempted 670 times so). The cap, the KV
tokens and the limit used are recorded in the manifest.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from thinkbatch.schemas.manifest import InFlightFigures

RATE_WINDOW = 64  # the rows whose ends measure the rate rows leave
LEAD_WINDOW = 8  # the claims whose lead counts: the longest of them
LEAD_FLOOR_S = 1.0  # the least lead counted: the worker looks at its backlog every 0.5 s
LEAD_MARGIN = 2.0


class InFlight:
    """The engine's in-flight limit; a replacement engine may report another cache."""

    def __init__(self, cap: int, kv_tokens: int | None, max_tokens: int,
                 expected_tokens: int | None = None):
        self.cap = cap
        self.kv_tokens = kv_tokens
        self.expected_tokens = expected_tokens or max_tokens

    @property
    def limit(self) -> int:
        if not self.kv_tokens:
            return self.cap
        return max(1, min(self.cap, self.kv_tokens // self.expected_tokens))

    def figures(self) -> InFlightFigures:
        return InFlightFigures(cap=self.cap, kv_cache_tokens=self.kv_tokens,
                               expected_tokens_per_row=self.expected_tokens, limit=self.limit)


class Backlog:
    """Rows handed to the pipeline that have not reached the engine yet (shards queued,
    rows read and waiting), and how many of them a worker should keep.

    A worker claims another shard while fewer rows wait than its engine starts before that
    shard's rows arrive: the rate rows leave the pipeline (each frees a slot) times the
    lead from asking for a claim to the shard's first rows read, twice over; the in-flight
    limit until rows have finished. With rows of a second that is the limit, so the
    engine never drains to the stragglers of the shards it holds. With rows of hours it
    is a row or two: a worker holding a limit's worth of waiting rows (hours of its
    engine's work) keeps them from the engines that run dry at the end of a job (the fleet
    simulation, benchmarks/fleet_sim.py). Counted from the caller's, the feeder's and the
    driver's threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._rows = 0
        self._lock = threading.Lock()
        self._clock = clock
        self._ends: deque[float] = deque(maxlen=RATE_WINDOW)  # when the last rows left
        self._leads: deque[float] = deque(maxlen=LEAD_WINDOW)  # claim-to-rows times, s

    def add(self, rows: int) -> None:
        with self._lock:
            self._rows += rows

    @property
    def rows(self) -> int:
        return self._rows

    def row_done(self) -> None:
        """A row left the pipeline (written or dropped): its slot is free."""
        with self._lock:
            self._ends.append(self._clock())

    def lead(self, seconds: float) -> None:
        """A claimed shard's first rows were read `seconds` after the claim was asked for."""
        with self._lock:
            self._leads.append(seconds)

    def wanted(self, limit: int) -> int:
        """The rows to keep waiting for an engine that holds `limit` at once."""
        with self._lock:
            ends, leads = list(self._ends), list(self._leads)
        if len(ends) < 2:
            return limit
        rate = (len(ends) - 1) / max(self._clock() - ends[0], 1e-9)  # rows leaving a second
        lead = max([LEAD_FLOOR_S, *leads])
        return max(1, min(limit, math.ceil(rate * lead * LEAD_MARGIN - 1e-6)))  # float error

    def wants_rows(self, limit: int) -> bool:
        return self._rows < self.wanted(limit)
