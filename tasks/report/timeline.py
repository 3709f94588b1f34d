"""Rows' time spans on a time grid: the report's throughput and engine occupancy over the run.

A part is committed when enough rows have finished, so commit times come in bursts: a rate
read from them peaks far over what the engine did (a demo's 300 rows read 7,000 output
tok/s from an engine that did 3,900). Each row keeps when it entered the engine and when it
finished (`started_at`, `finished_at`); here its output tokens are spread evenly over that
span, and its time in the engine counts for the worker that generated it, so a bin holds
the tokens generated and the row-seconds spent in it.

Memory stays flat, as the rest of the tally's (tasks/report/tally.py): the grid has at most
MAX_BINS bins, their width a power of two seconds, doubled (pairs of bins merged, which is
exact) whenever the spans seen so far would need more; parts are read in any order.
Per worker that is MAX_BINS floats.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

MAX_BINS = 4096
FINEST_S = 2.0 ** -10  # about a millisecond: the narrowest bin
# An interval with no row in any engine this long is cut out of the charts' time axis (a
# run stopped and resumed a day later; a retry's rows kept from its source): at least a
# minute and a twentieth of the time rows were in an engine.
GAP_MIN_S, GAP_SHARE = 60.0, 0.05


def spread(starts: np.ndarray, finishes: np.ndarray, weights: np.ndarray, first: int,
           width: float, bins: int) -> np.ndarray:
    """Each weight spread evenly over its span [start, finish] (seconds from bin `first`'s
    left edge at `first * width`), summed per bin; a span of no length puts its weight in
    the bin it lies in. Exact: a bin gets weight times the share of the span inside it."""
    origin = first * width
    s, f = (starts - origin) / width, (finishes - origin) / width  # in bins
    i, j = np.clip(np.floor(s).astype(np.int64), 0, bins - 1), \
        np.clip(np.floor(f).astype(np.int64), 0, bins - 1)
    length = f - s
    rate = np.divide(weights, length, out=np.zeros_like(weights, dtype=np.float64),
                     where=length > 0)  # weight per bin width
    out = np.zeros(bins + 1)
    one = i == j  # the whole span in one bin
    np.add.at(out, i[one], weights[one])
    many = ~one
    i, j, s, f, rate = i[many], j[many], s[many], f[many], rate[many]
    np.add.at(out, i, rate * (i + 1 - s))  # the first bin's share
    np.add.at(out, j, rate * (f - j))  # the last bin's
    steps = np.zeros(bins + 1)  # the bins between get the rate whole
    np.add.at(steps, i + 1, rate)
    np.add.at(steps, j, -rate)
    return (out + np.cumsum(steps))[:bins]


@dataclass
class View:
    """What the charts draw, over the time rows were in an engine: long gaps cut out
    (`gaps`: where, in seconds of the axis, and how long each was), in `edges.size - 1`
    bins. Rates per second of each bin; occupancy as mean rows in the engine."""

    edges: np.ndarray  # seconds since the first row entered an engine, gaps cut out
    tokens_per_s: np.ndarray
    rows_per_s: np.ndarray  # rows finished
    in_engine: dict[str, np.ndarray]  # worker -> mean rows in its engine per bin
    gaps: list[tuple[float, float]]


@dataclass
class Timeline:
    """Rows' output tokens over time, rows finished, and row-seconds in the engine per
    worker, on a grid that coarsens as it widens (module docstring)."""

    width: float = 0.0  # seconds per bin; 0 until a span is added
    first: int = 0  # the grid starts at first * width (Unix seconds)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    finished: np.ndarray = field(default_factory=lambda: np.zeros(0))
    busy: dict[str, np.ndarray] = field(default_factory=dict)  # worker -> row-seconds
    rows: int = 0  # rows with a span

    def add(self, starts: np.ndarray, finishes: np.ndarray, tokens: np.ndarray,
            workers: np.ndarray, names: list[str]) -> None:
        """Rows with both times (Unix seconds), their output tokens (0 where none) and
        the worker of each (an index into `names`)."""
        if not len(starts):
            return
        finishes = np.maximum(finishes, starts)  # a clock stepped back counts no time
        self._cover(float(starts.min()), float(finishes.max()))
        n = len(self.tokens)
        self.tokens += spread(starts, finishes, tokens.astype(np.float64), self.first,
                              self.width, n)
        self.finished += spread(finishes, finishes, np.ones(len(finishes)), self.first,
                                self.width, n)
        for code, name in enumerate(names):
            mine = workers == code
            if not mine.any():
                continue
            busy = self.busy.setdefault(name, np.zeros(n))
            busy += spread(starts[mine], finishes[mine], finishes[mine] - starts[mine],
                           self.first, self.width, n)
        self.rows += len(starts)

    def _cover(self, lo: float, hi: float) -> None:
        """Widen the grid to hold [lo, hi], doubling the bin width while it would need
        more than MAX_BINS bins."""
        if not self.width:
            self.width = max(FINEST_S, 2.0 ** math.ceil(math.log2(max(hi - lo, FINEST_S)
                                                                    / (MAX_BINS / 2))))
            self.first = math.floor(lo / self.width)
            self._resize(self.first, 1)
        while True:
            first = min(self.first, math.floor(lo / self.width))
            last = max(self.first + len(self.tokens), math.floor(hi / self.width) + 1)
            if last - first <= MAX_BINS:
                self._resize(first, last - first)
                return
            self._coarsen()

    def _series(self) -> list[np.ndarray]:
        return [self.tokens, self.finished, *self.busy.values()]

    def _resize(self, first: int, bins: int) -> None:
        before = self.first - first
        grown = [np.pad(a, (before, bins - before - len(a))) for a in self._series()]
        self.tokens, self.finished = grown[0], grown[1]
        self.busy = dict(zip(self.busy, grown[2:]))
        self.first = first

    def _coarsen(self) -> None:
        """Bins twice as wide: pairs merged, the grid's start kept on the wider grid."""
        odd = self.first % 2
        bins = len(self.tokens) + odd
        merged = [np.pad(a, (odd, bins % 2)).reshape(-1, 2).sum(axis=1) for a in self._series()]
        self.tokens, self.finished = merged[0], merged[1]
        self.busy = dict(zip(self.busy, merged[2:]))
        self.first = (self.first - odd) // 2
        self.width *= 2

    def view(self, bins: int) -> View | None:
        """The charts' series in about `bins` bins; None without a row with a span."""
        if not self.rows:
            return None
        # Row-seconds under a millionth of a bin are the sums' rounding, not a row.
        busy = sum(self.busy.values()) > 1e-6 * self.width
        active = np.flatnonzero(busy if busy.any() else self.finished)
        keep = np.zeros(len(self.tokens), bool)
        keep[active[0]:active[-1] + 1] = True
        gaps: list[tuple[float, float]] = []
        idle = _runs(~busy & keep) if busy.any() else []
        longest = max(GAP_MIN_S, GAP_SHARE * keep.sum() * self.width)
        for start, stop in idle:
            if (stop - start) * self.width >= longest:
                keep[start:stop] = False
                at = int(keep[:start].sum())
                gaps.append((at * self.width, (stop - start) * self.width))
        kept = np.flatnonzero(keep)
        group = max(1, math.ceil(len(kept) / bins))
        cuts = np.arange(0, len(kept), group)
        widths = np.diff(np.append(cuts, len(kept))) * self.width
        edges = np.append(cuts, len(kept)) * self.width

        def per_bin(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(a[kept], cuts) / widths

        return View(edges=edges, tokens_per_s=per_bin(self.tokens),
                    rows_per_s=per_bin(self.finished),
                    in_engine={w: per_bin(self.busy[w]) for w in sorted(self.busy, key=_natural)},
                    gaps=gaps)


def _natural(name: str) -> list[object]:
    """worker-2 before worker-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
