"""What watches a run's rows: one interface, and the fan-out the pipeline calls.

The pipeline knows its watchers only as listeners: the terminal progress and this run's
tally (report/progress.py), live Prometheus metrics (report/metrics.py), the trace
(report/trace.py), and whatever a caller adds (tasks/runner.py builds the list; the
flows add their progress artifact, flows/artifacts.py). Rows, requests and tool results
are told from the pipeline's driver thread; `committed` and `shard_done` from its writer
thread. A listener must be quick: the driver waits for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.record import ToolResult


class Listener:
    """Every event, each doing nothing: a listener overrides those it watches."""

    def submitted(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        """A request entered the engine (`turn`: a rollout's turn, from 1, else None)."""

    def finished(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        """The engine gave a request back."""

    def row_done(self, row: dict[str, Any]) -> None:
        """An output row (one sample), handed to the committer."""

    def done_before(self, rows: int) -> None:
        """Rows this run will not generate: committed by an earlier run in a shard it
        resumes, or a retry's rows copied from its source."""

    def tools_returned(self, results: Sequence[ToolResult]) -> None:
        """A conversation's tool results, back before its next turn."""

    def committed(self, shard_id: int, rows: int) -> None:
        """A part of `rows` rows committed."""

    def shard_done(self, shard_id: int, stats: ShardStats) -> None:
        """A shard's last part committed and its done marker written."""


class Listeners(Listener):
    """Several listeners as one, told in order."""

    def __init__(self, listeners: Iterable[Listener | None]):
        self._all = [one for one in listeners if one is not None]

    def submitted(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        for one in self._all:
            one.submitted(shard_id, row, sample, turn)

    def finished(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        for one in self._all:
            one.finished(shard_id, row, sample, turn)

    def row_done(self, row: dict[str, Any]) -> None:
        for one in self._all:
            one.row_done(row)

    def done_before(self, rows: int) -> None:
        for one in self._all:
            one.done_before(rows)

    def tools_returned(self, results: Sequence[ToolResult]) -> None:
        for one in self._all:
            one.tools_returned(results)

    def committed(self, shard_id: int, rows: int) -> None:
        for one in self._all:
            one.committed(shard_id, rows)

    def shard_done(self, shard_id: int, stats: ShardStats) -> None:
        for one in self._all:
            one.shard_done(shard_id, stats)
