"""This run's progress as rows finish: the terminal bar (rows done, time left, rows/s,
output tok/s) and the tally of the rows this run generated (report/figures.py). It
listens to the pipeline's rows (rows/listeners.py) and reads nothing else."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from thinkbatch.tasks.report.figures import RunTally
from thinkbatch.tasks.rows.listeners import Listener

# tqdm's own rate and time left would count rows done before the run; ours are in postfix.
BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class Progress(Listener):
    """Rows done, the time left, rows/s and output tok/s on the terminal (stderr); this
    run's tally of the rows it generated (`tally`).

    The time left counts only this run's work: rows done before it (done shards, rows an
    earlier run committed in the shards it resumes, a retry's copied rows) are neither
    in the rate nor in what remains. `total` and the counts are rows of the output (each
    sample is a row)."""

    def __init__(self, total: int, already_done: int, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self.total = total
        self.before = already_done
        self.rows = 0
        self.tally = RunTally()
        self._bar = None
        if enabled:
            self._bar = tqdm(total=total, initial=already_done, unit="row", file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5, desc="rows", bar_format=BAR)

    def row_done(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.tally.add(row)
        if self._bar is not None:
            self._bar.update(1)
            if self.rows % 16 == 0:
                self._bar.set_postfix_str(self.rates(), refresh=False)

    @property
    def tokens(self) -> int:
        """Output tokens of this run's rows."""
        return self.tally.completion_tokens

    def done_before(self, rows: int) -> None:
        """Rows an earlier run committed in a shard this run resumes (the feeder skips
        them), or a retry's rows copied from its source: on the bar, not in the run's
        figures."""
        self.before += rows
        if self._bar is not None:
            self._bar.update(rows)

    def elapsed(self) -> float:
        return max(self._clock() - self.started, 1e-9)

    def remaining(self) -> int:
        return max(self.total - self.before - self.rows, 0)

    def eta_s(self) -> float | None:
        """Seconds left at this run's rate so far; None before its first row."""
        return self.remaining() * self.elapsed() / self.rows if self.rows else None

    def percent(self) -> float:
        return min(100.0, 100.0 * (self.before + self.rows) / self.total) if self.total else 100.0

    def rates(self) -> str:
        eta = self.eta_s()
        left = "?" if eta is None else tqdm.format_interval(eta)
        return (f"{left} left, {self.rows / self.elapsed():,.1f} rows/s, "
                f"{self.tokens / self.elapsed():,.0f} out tok/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
