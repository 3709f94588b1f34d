"""How many requests the engine holds at once: the job's cap, or fewer where the KV cache
would not hold them.

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

import threading

from thinkbatch.schemas.manifest import InFlightFigures


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
    rows read and waiting): a worker claims another shard while these run low, instead of
    waiting for a whole shard to finish, so the engine is never left to the stragglers of
    the shards it holds. Counted from the caller's and the feeder's threads."""

    def __init__(self) -> None:
        self._rows = 0
        self._lock = threading.Lock()

    def add(self, rows: int) -> None:
        with self._lock:
            self._rows += rows

    @property
    def rows(self) -> int:
        return self._rows
