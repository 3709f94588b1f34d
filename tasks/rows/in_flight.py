"""How many requests the engine holds at once: the job's cap, or fewer where the KV cache
would not hold them.

Over its KV cache vLLM preempts running requests and recomputes them later: with rows of
10-40k tokens, Kimi-K2-Thinking's preset cap (1024) is several times what its cache holds
(the recipe's logs: 5,721,088 tokens with DCP8, 715,072 with TP8 alone). So the limit is
the KV-cache tokens the loaded engine reports over the tokens a request is expected to
hold: `engine.expected_tokens_per_row` where the job sets it, else `sampling.max_tokens`
(nothing preempted), until MEASURED_AFTER requests finished; then their mean prompt plus
completion. The cap, the KV tokens and the limit used are recorded in the manifest.
"""

from __future__ import annotations

import threading

from thinkbatch.schemas.manifest import InFlightFigures

MEASURED_AFTER = 32  # finished requests before their mean replaces the starting estimate


class InFlight:
    """The engine's in-flight limit, updated as requests finish (driver thread)."""

    def __init__(self, cap: int, kv_tokens: int | None, max_tokens: int,
                 expected_tokens: int | None = None):
        self.cap = cap
        self.kv_tokens = kv_tokens
        self._start = expected_tokens or max_tokens
        self._tokens = 0
        self._finished = 0

    def finished(self, tokens: int) -> None:
        """A request that held `tokens` (prompt + completion) left the engine."""
        self._tokens += tokens
        self._finished += 1

    @property
    def expected_tokens(self) -> int:
        if self._finished >= MEASURED_AFTER:
            return max(1, self._tokens // self._finished)
        return self._start

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
