"""What an output holds, tallied batch by batch for its report (tasks/report/html_report.py).

Memory stays flat whatever the output's size: only the columns a chart needs are read
(nested ones down to the leaf: a tool call's name, never its arguments), one record
batch at a time, into fixed-size accumulators. Token counts go into an exact count per
value (its size follows the longest completion, not the number of rows); seconds go
into fixed log-spaced bins, fine enough that a percentile read from them is within 0.6%,
so no pass has to hold a column or learn its range first. This run's figures in the
manifest (tasks/report/figures.py) use the same bins, so both read the same percentiles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.tasks.report.timeline import Timeline
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.checkpoint import sum_ints
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import join

BATCH_ROWS = 16_384
# Seconds: 1e-4 s .. 1e5 s, 200 bins a decade (1.16% wide: a bin's geometric middle is
# within 0.6% of any value in it); values outside fall into the end bins.
LOG_LO, LOG_HI, BINS_PER_DECADE = -4, 5, 200
SECOND_EDGES = np.logspace(LOG_LO, LOG_HI, (LOG_HI - LOG_LO) * BINS_PER_DECADE + 1)

NUMERIC = ["status", "prompt_tokens", "completion_tokens", "reasoning_tokens", "ttft_s",
           "latency_s"]
TOOL_NAMES = "tool_calls.list.element.name"
# A rollout's tools as run: every turn's results (name, and the error when one failed).
RESULT_NAMES = "turns.list.element.tool_results.list.element.name"
RESULT_ERRORS = "turns.list.element.tool_results.list.element.error"
SPAN = ["started_at", "finished_at", "worker"]  # parts written before rows kept them lack these
UNNAMED_WORKER = "(unnamed)"


@dataclass
class TokenCounts:
    """How many rows had each token count: exact sums, means and percentiles."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        batch = np.bincount(values, minlength=len(self.counts))
        batch[:len(self.counts)] += self.counts
        self.counts = batch

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def total(self) -> int:
        return int(np.dot(self.counts, np.arange(len(self.counts))))

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        return float(np.searchsorted(np.cumsum(self.counts), q / 100 * self.n))


@dataclass
class Seconds:
    """Durations in fixed log-spaced bins, with their exact count, sum and extremes."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(SECOND_EDGES) - 1, np.int64))
    total: float = 0.0
    low: float = float("inf")
    high: float = 0.0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        bins = np.clip(np.searchsorted(SECOND_EDGES, values, side="right") - 1,
                       0, len(self.counts) - 1)
        self.counts += np.bincount(bins, minlength=len(self.counts))
        self.total += float(values.sum())
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def percentile(self, q: float) -> float | None:
        """The geometric middle of the bin holding the q-th percentile, kept within the
        exact extremes (which the 0th and 100th are)."""
        if not self.n:
            return None
        if q >= 100:
            return self.high
        i = int(np.searchsorted(np.cumsum(self.counts), q / 100 * self.n))
        middle = float(np.sqrt(SECOND_EDGES[i] * SECOND_EDGES[i + 1]))
        return min(max(middle, self.low), self.high)


@dataclass(frozen=True)
class PartCommit:
    """One committed part: when (Unix time, from its shard's marker), rows, output tokens."""

    at: float
    rows: int
    output_tokens: int


@dataclass
class Tally:
    rollout: bool = False
    status: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    prompted: int = 0  # rows with a prompt token count
    completion_tokens: int = 0
    reasoning: TokenCounts = field(default_factory=TokenCounts)
    answer: TokenCounts = field(default_factory=TokenCounts)
    ttft: Seconds = field(default_factory=Seconds)
    latency: Seconds = field(default_factory=Seconds)
    commits: list[PartCommit] = field(default_factory=list)
    untimed_parts: int = 0  # parts whose marker has no commit time (written before it was kept)
    timeline: Timeline = field(default_factory=Timeline)  # rows' spans in the engine
    unspanned: int = 0  # rows generated (a completion) with no start or finish time
    tools: Counter[str] = field(default_factory=Counter)  # calls by name
    tool_failures: Counter[str] = field(default_factory=Counter)  # rollouts: failed, by name
    turns: int = 0  # rollouts: engine turns of every conversation

    @property
    def rows(self) -> int:
        return sum(self.status.values())

    @property
    def rollout_sums(self) -> dict[str, int]:
        """A rollout's sums as its done markers keep them: the tool counts are those by
        name, added up (each tool result read once)."""
        return {"turns": self.turns, "tool_calls_total": sum(self.tools.values()),
                "tool_errors": sum(self.tool_failures.values())}


def _add_tokens(tally: Tally, batch: pa.RecordBatch) -> int:
    """Reasoning and answer tokens of the rows that had a completion; returns the batch's
    output tokens. A row with no reasoning parsed has zero reasoning tokens."""
    completion = batch.column("completion_tokens")
    done = pc.is_valid(completion)
    total = pc.filter(completion, done)
    reasoning = pc.min_element_wise(
        pc.fill_null(pc.filter(batch.column("reasoning_tokens"), done), 0), total)
    tally.reasoning.add(reasoning.to_numpy(zero_copy_only=False).astype(np.int64))
    tally.answer.add(pc.subtract(total, reasoning).to_numpy(zero_copy_only=False).astype(np.int64))
    return sum_ints(total)


def _seconds(col: pa.Array) -> np.ndarray:
    return pc.drop_null(col).to_numpy(zero_copy_only=False)


def _add_tools(tally: Tally, batch: pa.RecordBatch) -> None:
    if tally.rollout:
        results = pc.list_flatten(pc.list_flatten(batch.column("turns")).field("tool_results"))
        names = results.field("name")
        tally.tools.update(_value_counts(names))
        failed = pc.is_valid(results.field("error"))
        tally.tool_failures.update(_value_counts(pc.filter(names, failed)))
        tally.turns += sum_ints(batch.column("num_turns"))
    else:
        tally.tools.update(_value_counts(pc.list_flatten(batch.column("tool_calls")).field("name")))


def _value_counts(names: pa.Array) -> dict[str, int]:
    counts = pc.value_counts(pc.fill_null(names, "(unnamed)"))
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _add_spans(tally: Tally, batch: pa.RecordBatch, spans: bool) -> None:
    """Rows with a start and a finish into the timeline; rows with a completion but no
    span (a part written before rows kept them, a replay) are counted apart."""
    if not spans:
        tally.unspanned += len(batch) - batch.column("completion_tokens").null_count
        return
    start, finish = batch.column("started_at"), batch.column("finished_at")
    timed = pc.and_(pc.is_valid(start), pc.is_valid(finish))
    tally.unspanned += len(batch) - batch.column("completion_tokens").null_count - sum_ints(
        pc.and_(timed, pc.is_valid(batch.column("completion_tokens"))).cast(pa.int64()))

    def unix_s(col: pa.Array) -> np.ndarray:
        return pc.filter(col, timed).cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6

    tokens = pc.fill_null(pc.filter(batch.column("completion_tokens"), timed), 0)
    workers = pc.dictionary_encode(
        pc.fill_null(pc.filter(batch.column("worker"), timed), UNNAMED_WORKER))
    tally.timeline.add(unix_s(start), unix_s(finish), tokens.to_numpy(zero_copy_only=False),
                       workers.indices.to_numpy(zero_copy_only=False),
                       workers.dictionary.to_pylist())


def _columns(names: list[str]) -> tuple[list[str], bool, bool]:
    rollout = "turns" in names
    spans = all(n in names for n in SPAN)
    tools = [RESULT_NAMES, RESULT_ERRORS, "num_turns"] if rollout else [TOOL_NAMES]
    return NUMERIC + tools + (SPAN if spans else []), rollout, spans


def _add_part(tally: Tally, layout: OutputLayout, part: str, committed_at: float | None) -> None:
    file = layout.store.open_parquet(part)
    columns, tally.rollout, spans = _columns(file.schema_arrow.names)
    rows = tokens = 0
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        rows += batch.num_rows
        tally.status.update(_value_counts(batch.column("status")))
        prompt = batch.column("prompt_tokens")
        tally.prompt_tokens += sum_ints(prompt)
        tally.prompted += len(prompt) - prompt.null_count
        tokens += _add_tokens(tally, batch)
        tally.ttft.add(_seconds(batch.column("ttft_s")))
        tally.latency.add(_seconds(batch.column("latency_s")))
        _add_tools(tally, batch)
        _add_spans(tally, batch, spans)
    tally.completion_tokens += tokens
    if committed_at is None:
        tally.untimed_parts += 1
    else:
        tally.commits.append(PartCommit(committed_at, rows, tokens))


def tally_output(layout: OutputLayout) -> Tally:
    """Every part its shards' done markers list (orphans are not the output's), one at
    a time."""
    markers = checkpoint.read_markers(layout, sorted(checkpoint.done_shards(layout)))
    return tally_markers(layout, [m for m in markers.values() if m is not None])


def tally_markers(layout: OutputLayout, markers: Iterable[ShardStats]) -> Tally:
    """The parts these markers list: what finalize tallies from the markers it has read."""
    tally = Tally()
    for marker in markers:
        _add_marker(tally, layout, marker)
    tally.commits.sort(key=lambda c: c.at)
    return tally


def _add_marker(tally: Tally, layout: OutputLayout, marker: ShardStats) -> None:
    times = marker.committed_at or {}
    for name in marker.parts:
        _add_part(tally, layout, join(layout.data, name), times.get(name))
