"""This run's figures, tallied row by row as rows finish: the seed's metrics table
(requests/s, output tok/s, mean and median TTFT) plus latency percentiles and reasoning
against answer tokens, for the rows this run generated and no others.

Memory stays flat: counts and sums, and TTFT and latency in the fixed log-spaced bins of
the report's tally (tasks/report/tally.py `Seconds`, percentiles within 0.6%), so the
manifest and the report read the same percentiles the same way. A scale-out worker's
tally travels to the parent as its state (`TallyState`) and merges there: bins add up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from thinkbatch.schemas.manifest import (Metrics, RunFigures, SecondsState, Spread, TallyState,
                                         Tokens, WorkerFigures)
from thinkbatch.tasks.report.tally import Seconds

FLUSH_VALUES = 4096  # seconds buffered per row before they go into the bins at once


class RunTally:
    """Counts by status, engine requests, token sums, TTFT and latency of the rows this
    process finished. One thread adds rows (the pipeline's driver); read it after."""

    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.requests = 0  # engine requests: one per row with a completion, a rollout's turns
        self.prompted = self.completed = 0  # rows with prompt tokens, with a completion
        self.prompt_tokens = self.completion_tokens = self.reasoning_tokens = 0
        self.ttft, self.latency = Seconds(), Seconds()
        self._ttft: list[float] = []
        self._latency: list[float] = []

    def add(self, row: dict[str, Any]) -> None:
        self.status[row["status"]] += 1
        if row["prompt_tokens"] is not None:
            self.prompted += 1
            self.prompt_tokens += row["prompt_tokens"]
        if (completion := row["completion_tokens"]) is not None:
            self.completed += 1
            self.completion_tokens += completion
            self.reasoning_tokens += min(row["reasoning_tokens"] or 0, completion)
        turns = row.get("num_turns")
        self.requests += turns if turns is not None else int(row["finish_reason"] is not None)
        if row["ttft_s"] is not None:
            self._ttft.append(row["ttft_s"])
        if row["latency_s"] is not None:
            self._latency.append(row["latency_s"])
        if len(self._latency) >= FLUSH_VALUES or len(self._ttft) >= FLUSH_VALUES:
            self._flush()

    def _flush(self) -> None:
        self.ttft.add(np.asarray(self._ttft, dtype=np.float64))
        self.latency.add(np.asarray(self._latency, dtype=np.float64))
        self._ttft, self._latency = [], []

    @property
    def rows(self) -> int:
        return sum(self.status.values())

    def metrics(self, generation_s: float | None) -> Metrics:
        """The table's figures; rates over `generation_s` (none without it)."""
        self._flush()
        per_s = (lambda n: n / generation_s) if generation_s else (lambda n: None)
        answer = self.completion_tokens - self.reasoning_tokens
        return Metrics(
            status=dict(sorted(self.status.items())), requests=self.requests,
            requests_per_s=per_s(self.requests),
            ttft_s=_spread(self.ttft), latency_s=_spread(self.latency),
            prompt_tokens=_tokens(self.prompt_tokens, self.prompted),
            completion_tokens=_tokens(self.completion_tokens, self.completed),
            reasoning_tokens=_tokens(self.reasoning_tokens, self.completed),
            answer_tokens=_tokens(answer, self.completed))

    def state(self) -> TallyState:
        self._flush()
        return TallyState(status=dict(self.status), requests=self.requests,
                          prompted=self.prompted, completed=self.completed,
                          prompt_tokens=self.prompt_tokens,
                          completion_tokens=self.completion_tokens,
                          reasoning_tokens=self.reasoning_tokens,
                          ttft_s=_seconds_state(self.ttft),
                          latency_s=_seconds_state(self.latency))

    def merge(self, state: TallyState) -> None:
        """Add another process's tally (a scale-out worker's)."""
        self.status.update(state.status)
        self.requests += state.requests
        self.prompted += state.prompted
        self.completed += state.completed
        self.prompt_tokens += state.prompt_tokens
        self.completion_tokens += state.completion_tokens
        self.reasoning_tokens += state.reasoning_tokens
        _merge_seconds(self.ttft, state.ttft_s)
        _merge_seconds(self.latency, state.latency_s)


def _spread(seconds: Seconds) -> Spread | None:
    if not seconds.n:
        return None
    return Spread(mean=seconds.mean(), p50=seconds.percentile(50), p90=seconds.percentile(90),
                  p99=seconds.percentile(99))


def _tokens(total: int, rows: int) -> Tokens:
    return Tokens(total=total, mean=total / rows if rows else None)


def _seconds_state(seconds: Seconds) -> SecondsState | None:
    if not seconds.n:
        return None
    (bins,) = np.nonzero(seconds.counts)
    return SecondsState(bins={int(b): int(seconds.counts[b]) for b in bins},
                        total=seconds.total, low=seconds.low, high=seconds.high)


def _merge_seconds(seconds: Seconds, state: SecondsState | None) -> None:
    if state is None:
        return
    for b, n in state.bins.items():
        seconds.counts[b] += n
    seconds.total += state.total
    seconds.low, seconds.high = min(seconds.low, state.low), max(seconds.high, state.high)


def merge_workers(reports: list[WorkerFigures], generation_s: float) -> RunFigures:
    """A scale-out run's figures from the figures its workers wrote: their sums and merged
    tallies, rates over `generation_s` (the time the workers' rounds took), and each
    worker's own under its flow run's name. A worker that wrote none (killed) is missing
    from these; its committed rows are in the output's totals."""
    tally = RunTally()
    for report in reports:
        tally.merge(report.tally)
    figures = [r.figures for r in reports]
    run = RunFigures(
        shards=sorted(s for f in figures for s in f.shards or []),
        rows_generated=sum(f.rows_generated for f in figures),
        output_tokens=sum(f.output_tokens or 0 for f in figures),
        generation_s=generation_s,
        engine_restarts=sum(f.engine_restarts or 0 for f in figures),
        turns_capped=sum(f.turns_capped or 0 for f in figures),
        turns_rerendered=sum(f.turns_rerendered or 0 for f in figures),
        tool_results_hidden=sum(f.tool_results_hidden or 0 for f in figures),
        metrics=tally.metrics(generation_s),
        workers={r.name: r.figures for r in reports})
    with_rates(run, generation_s)
    return run


def with_rates(run: RunFigures, seconds: float) -> None:
    """Rows and output tokens per second over `seconds` of generation: the one place a
    run's rates are computed (a worker's over its own time, a scale-out run's over its
    rounds)."""
    if seconds > 0:
        run.rows_per_s = run.rows_generated / seconds
        run.output_tokens_per_s = (run.output_tokens or 0) / seconds
