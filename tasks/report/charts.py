"""The report's charts, drawn by matplotlib from an output's tally (tasks/report/tally.py).

Figures are made with matplotlib's object API on the Agg canvas, never pyplot: no global
state, so a report drawn in a Prefect task's thread cannot disturb another. A chart with
nothing to show (no tool calls, every row failed before its first token) still renders,
saying so, so the page always names every chart.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from thinkbatch.schemas.output import Status
from thinkbatch.schemas.manifest import RunFigures
from thinkbatch.tasks.report.tally import SECOND_EDGES, PartCommit, Seconds, Tally, TokenCounts

DPI = 110
WIDTH_IN = 8.4
HIST_BINS = 40
TAIL_PERCENTILE = 99.9  # token histograms end here; longer rows join the last bar
TIME_BINS = 60
OCCUPANCY_BINS = 120
MAX_WORKER_LINES = 8  # more workers: one coloured row each instead of a line each
LOG_LABELS = 6  # a time axis's labels are at least 1/6 of its width apart
TOP_TOOLS = 20
INK, MUTED = "#1f2933", "#7b8794"
STATUS_COLORS = {s.value: c for s, c in {
    Status.OK: "#2f9e44", Status.TRUNCATED: "#f08c00", Status.NO_ANSWER: "#fab005",
    Status.PARSE_ERROR: "#e8590c", Status.SCHEMA_ERROR: "#d6336c",
    Status.INVALID_INPUT: "#868e96", Status.PROMPT_TOO_LONG: "#495057",
    Status.ENGINE_ERROR: "#c92a2a", Status.MAX_TURNS: "#7048e8",
    Status.TOOL_ERROR: "#a61e4d"}.items()}
REASONING, ANSWER = "#4263eb", "#0c8599"
TTFT, LATENCY = "#ae3ec9", "#1c7ed6"
ROWS, TOKENS = "#2f9e44", "#f76707"
FAILED = "#e03131"
WORKER_COLORS = ["#1c7ed6", "#f76707", "#2f9e44", "#ae3ec9", "#e03131", "#0c8599",
                 "#f59f00", "#495057"]


@dataclass(frozen=True)
class Chart:
    name: str  # the PNG's file name, without .png
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Limits:
    """Each worker's in-flight limit as the manifest records it: a scale-out worker's under
    its name, a one-process run's for every worker. A worker the manifest does not name (an
    earlier run's, a retry's source's) gets the limit every named worker shares, if one."""

    by_worker: dict[str, int]
    shared: int | None

    @classmethod
    def of_run(cls, run: RunFigures) -> Limits:
        if run.workers is None:
            limit = run.in_flight.limit if run.in_flight is not None else None
            return cls({}, limit)
        named = {w: f.in_flight.limit for w, f in run.workers.items() if f.in_flight is not None}
        values = set(named.values())
        return cls(named, values.pop() if len(values) == 1 else None)

    def of(self, worker: str) -> int | None:
        return self.by_worker.get(worker, self.shared)


def _figure(height_in: float, rows: int = 1, cols: int = 1,
            **subplots: object) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **subplots).ravel()
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(colors=INK, labelsize=9)
        ax.grid(axis="y", color="#e4e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", facecolor="white")
    return out.getvalue()


def _nothing(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color=MUTED, fontsize=11,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.spines[["left", "bottom"]].set_visible(False)


def _legend_above_bars(ax: Axes, highest: float) -> None:
    """Headroom over the tallest bar for a legend that hides the lines it crosses."""
    ax.set_ylim(0, highest * 1.3)
    ax.legend(fontsize=8.5, loc="upper right", framealpha=0.92, edgecolor="none")


def _bar_rows(n: int) -> tuple[float, tuple[float, float]]:
    """Figure height and y range for n horizontal bars: bars as thick with one as with many."""
    slots = max(n, 2)
    extra = (slots - n) / 2
    return 1.0 + 0.36 * slots, (-0.5 - extra, n - 0.5 + extra)


def _thousands(ax: Axes, axis: str = "y") -> None:
    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _count_axis(ax: Axes, label: str) -> None:
    """The x axis of a horizontal bar chart: whole counts with thousands separators,
    vertical grid lines only."""
    ax.grid(axis="y", visible=False)
    ax.grid(axis="x", color="#e4e7eb", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    _thousands(ax, "x")
    ax.set_xlabel(label, color=INK)


def status_chart(status: Counter[str]) -> Chart:
    rows = sum(status.values())
    items = sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))
    caption = f"{rows:,} rows in the output."
    if not items:
        return Chart("status", "Rows by status", caption, _placeholder("no rows"))
    height, ylim = _bar_rows(len(items))
    fig, (ax,) = _figure(height)
    ax.set_ylim(*ylim)
    names = [k for k, _ in items][::-1]
    counts = [v for _, v in items][::-1]
    bars = ax.barh(names, counts, color=[STATUS_COLORS.get(n, MUTED) for n in names],
                   height=0.6)
    ax.bar_label(bars, [f" {c:,} ({c / rows:.1%})" for c in counts], color=INK, fontsize=9)
    ax.set_xlim(0, max(counts) * 1.28)
    _count_axis(ax, "rows")
    return Chart("status", "Rows by status", caption, _png(fig))


def _token_hist(ax: Axes, counts: TokenCounts, color: str, label: str) -> None:
    """Bins up to the 99.9th percentile; the rare longer rows join the last bar, so a few
    outliers cannot squeeze the rest into one bar."""
    top = int(counts.percentile(TAIL_PERCENTILE))
    width = max(1, int(np.ceil((top + 1) / HIST_BINS)))
    starts = np.arange(0, top + 1, width)
    cut = starts[-1] + width
    binned = np.add.reduceat(np.pad(counts.counts[:cut], (0, max(0, cut - len(counts.counts)))),
                             starts)
    beyond = int(counts.counts[cut:].sum())
    binned[-1] += beyond
    ax.stairs(binned, np.append(starts, cut), fill=True, color=color, alpha=0.85)
    median, p99 = counts.percentile(50), counts.percentile(99)
    ax.axvline(median, color=INK, linestyle="--", linewidth=1,
               label=f"median {median:,.0f}")
    ax.axvline(p99, color=INK, linestyle=":", linewidth=1, label=f"p99 {p99:,.0f}")
    if beyond:
        ax.plot([], [], " ", label=f"last bar: {beyond:,} rows up to {len(counts.counts) - 1:,}")
    _legend_above_bars(ax, binned.max())
    ax.set_xlim(0, cut)
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    _thousands(ax)
    _thousands(ax, "x")
    ax.set_xlabel(f"{label} per row", color=INK)
    ax.set_ylabel("rows", color=INK)


def _placeholder(text: str) -> bytes:
    """A short figure in place of a chart with nothing to show."""
    fig, (ax,) = _figure(1.4)
    _nothing(ax, text)
    return _png(fig)


def tokens_chart(reasoning: TokenCounts, answer: TokenCounts) -> Chart:
    name, title = "tokens", "Reasoning and answer tokens"
    caption = (f"Rows with a completion: {reasoning.n:,}. A row whose reasoning was not "
               "parsed counts zero reasoning tokens.")
    if not reasoning.n:
        return Chart(name, title, caption, _placeholder("no rows with a completion"))
    fig, (left, right) = _figure(3.2, cols=2)
    _token_hist(left, reasoning, REASONING, "reasoning tokens")
    _token_hist(right, answer, ANSWER, "answer tokens")
    left.set_title("Reasoning", color=INK, fontsize=10)
    right.set_title("Answer (completion − reasoning)", color=INK, fontsize=10)
    return Chart(name, title, caption, _png(fig))


def _seconds_unit(v: float) -> tuple[float, str]:
    """The unit a duration is labelled in: seconds up to 1,000, minutes up to 10 h."""
    if v < 1:
        return 1e-3, "ms"
    if v < 1000:
        return 1.0, "s"
    if v < 36_000:
        return 60.0, "min"
    return 3600.0, "h"


def _seconds_label(v: float) -> str:
    unit, name = _seconds_unit(v)
    return f"{v / unit:.3g} {name}" if unit <= 1 else f"{v / unit:,.0f} {name}"


def _log_ticks(lo: float, hi: float, labels: int = LOG_LABELS) -> list[float]:
    """Labelled ticks of a log time axis from lo to hi seconds: values round in the unit
    they are labelled in, the roundest first (1, 3, then 2 and 5, then the other digits
    of each decade), each kept only where it lies at least 1/`labels` of the axis from
    those kept. However few decades the axis spans, labels never run into each other
    (700, 800 and 900 ms are too close on a half-decade axis); an axis with room for no
    round value is labelled at its ends."""
    gap = np.log10(hi / lo) / labels
    kept: list[float] = []
    for digits in ((1,), (3,), (2, 5), (4, 6, 7, 8, 9)):
        for unit in (1e-3, 1.0, 60.0, 3600.0):
            for decade in range(int(np.floor(np.log10(lo / unit))),
                                int(np.ceil(np.log10(hi / unit))) + 1):
                for digit in digits:
                    v = digit * 10.0 ** decade * unit
                    if (lo <= v <= hi and _seconds_unit(v)[0] == unit
                            and all(abs(np.log10(v / k)) >= gap for k in kept)):
                        kept.append(v)
    return sorted(kept) if len(kept) >= 2 else [lo, hi]


def _time_hist(ax: Axes, s: Seconds, color: str, label: str) -> None:
    if not s.n:
        _nothing(ax, f"no rows with a {label}")
        return
    nonzero = np.flatnonzero(s.counts)
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    group = max(1, int(np.ceil((hi - lo) / HIST_BINS)))
    starts = np.arange(lo, hi, group)
    binned = np.add.reduceat(s.counts[:starts[-1] + group], starts)
    edges = SECOND_EDGES[np.append(starts, min(starts[-1] + group, len(SECOND_EDGES) - 1))]
    ax.stairs(binned, edges, fill=True, color=color, alpha=0.85)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(edges[0], edges[-1])))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _seconds_label(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(edges[0], edges[-1])
    for q, style in ((50, "--"), (99, ":")):
        v = s.percentile(q)
        ax.axvline(v, color=INK, linestyle=style, linewidth=1,
                   label=f"{'median' if q == 50 else 'p99'} {_seconds_label(v)}")
    _legend_above_bars(ax, binned.max())
    ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    _thousands(ax)
    ax.set_xlabel(f"{label} (log scale)", color=INK)
    ax.set_ylabel("rows", color=INK)


def timing_chart(ttft: Seconds, latency: Seconds) -> Chart:
    name, title = "timing", "TTFT and latency distributions"
    caption = (f"Rows with a time to first token: {ttft.n:,}; with a latency: {latency.n:,}. "
               "A rollout counts its first turn's TTFT and the whole conversation's time.")
    if not ttft.n and not latency.n:
        return Chart(name, title, caption, _placeholder("no rows with a time to first token "
                                                        "or a latency"))
    fig, (left, right) = _figure(3.2, cols=2)
    _time_hist(left, ttft, TTFT, "time to first token")
    _time_hist(right, latency, LATENCY, "latency")
    left.set_title("Time to first token", color=INK, fontsize=10)
    right.set_title("Latency (request to last token)", color=INK, fontsize=10)
    return Chart(name, title, caption, _png(fig))


def _time_unit(span_s: float) -> tuple[str, float]:
    if span_s < 180:
        return "seconds", 1.0
    if span_s < 3 * 3600:
        return "minutes", 60.0
    return "hours", 3600.0


def _commit_throughput(commits: list[PartCommit], untimed_parts: int) -> Chart:
    """Rates from part commit times: the fallback for an output whose rows have no start
    and finish times (written by an older version). Commits come in bursts, so the rate
    peaks over what the engine did."""
    caption = ("From the commit time of each part (this output's rows have no start and "
               "finish times: written by an older version): the rows and output tokens "
               "committed per interval, from the first commit on. Parts are committed in "
               "bursts, so the rate's peaks overstate the engine's.")
    if untimed_parts:
        caption += (f" {untimed_parts:,} parts have no recorded commit time (written by an "
                    "older version or by a run that was killed) and are left out.")
    span = commits[-1].at - commits[0].at if commits else 0.0
    if len(commits) < 2 or span <= 0:
        return Chart("throughput", "Throughput over the run", caption,
                     _placeholder("fewer than two commit times: no throughput over time to show"))
    at = np.array([c.at - commits[0].at for c in commits])
    rows = np.array([c.rows for c in commits])
    tokens = np.array([c.output_tokens for c in commits])
    bins = int(np.clip(len(commits) // 2, 1, TIME_BINS))
    edges = np.linspace(0, span, bins + 1)
    # The first part's rows were made before the first commit, which starts the clock.
    rate_tokens = np.histogram(at[1:], edges, weights=tokens[1:])[0] / (span / bins)
    rate_rows = np.histogram(at[1:], edges, weights=rows[1:])[0] / (span / bins)
    fig = _rates_figure(np.append(0, at), np.append(0, np.cumsum(rows)), "rows committed",
                        edges, rate_tokens, rate_rows, "the first commit", [])
    return Chart("throughput", "Throughput over the run", caption, _png(fig))


def _rates_figure(done_at: np.ndarray, done: np.ndarray, done_label: str, edges: np.ndarray,
                  rate_tokens: np.ndarray, rate_rows: np.ndarray, since: str,
                  gaps: list[tuple[float, float]], mean_tokens: float | None = None) -> Figure:
    """Rows done over time above; output tok/s (bars) and rows/s (line) per interval below."""
    span = float(edges[-1])
    fig, (top, bottom) = _figure(4.8, rows=2, sharex=True, height_ratios=[1, 1.2])
    unit, scale = _time_unit(span)
    top.step(done_at / scale, done, where="post", color=ROWS, linewidth=1.6)
    top.set_ylabel(done_label, color=INK)
    top.set_ylim(bottom=0)
    _thousands(top)
    handles: list[Artist] = [bottom.stairs(rate_tokens, edges / scale, fill=True,
                                           color=TOKENS, alpha=0.8, label="output tok/s")]
    bottom.set_ylabel("output tok/s", color=INK)
    bottom.set_ylim(0, max(rate_tokens.max(), 1) * 1.25)  # room for the legend
    _thousands(bottom)
    if mean_tokens is not None:
        handles.append(bottom.axhline(mean_tokens, color=INK, linestyle="--", linewidth=1,
                                      label=f"mean {mean_tokens:,.0f} tok/s"))
    rows_ax = bottom.twinx()
    handles.insert(1, rows_ax.stairs(rate_rows, edges / scale, color=ROWS, linewidth=1.6,
                                     label="rows/s"))
    rows_ax.set_ylabel("rows/s", color=ROWS)
    rows_ax.set_ylim(0, max(rate_rows.max(), 1) * 1.25)
    rows_ax.tick_params(colors=ROWS, labelsize=9)
    rows_ax.spines[["top"]].set_visible(False)
    bottom.legend(handles=handles, frameon=False, fontsize=8.5, loc="upper left",
                  ncols=len(handles))
    _mark_gaps([top, bottom], gaps, scale)
    bottom.set_xlabel(_since(unit, since, gaps), color=INK)
    for ax in (top, bottom):
        ax.set_xlim(0, span / scale)
    return fig


def _since(unit: str, since: str, gaps: list[tuple[float, float]]) -> str:
    return f"{unit} since {since}" + (", idle gaps cut out" if gaps else "")


def _mark_gaps(axes: list[Axes], gaps: list[tuple[float, float]], scale: float) -> None:
    """A cut-out gap (no row in any engine) as a dotted line saying how long it was."""
    for at, length in gaps:
        for ax in axes:
            ax.axvline(at / scale, color=MUTED, linestyle=":", linewidth=1.2)
        axes[0].annotate(f"gap {_seconds_label(length)}", (at / scale, 1), xytext=(3, -3),
                         xycoords=("data", "axes fraction"), textcoords="offset points",
                         va="top", fontsize=8, color=MUTED)


def throughput_chart(tally: Tally) -> Chart:
    view = tally.timeline.view(TIME_BINS)
    if view is None:
        return _commit_throughput(tally.commits, tally.untimed_parts)
    caption = ("Each row's output tokens spread evenly over its time in the engine "
               "(started_at to finished_at), and rows as they finished, per interval. The "
               "dashed line is the mean over the time rows were in an engine.")
    if view.gaps:
        caption += (f" {len(view.gaps):,} gaps with no row in any engine (a run stopped "
                    "and resumed, a retry's rows kept from its source) are cut out.")
    if tally.unspanned:
        caption += (f" {tally.unspanned:,} rows with a completion have no start and finish "
                    "times (written by an older version, or re-parsed) and are left out.")
    widths = np.diff(view.edges)
    done = np.append(0, np.cumsum(view.rows_per_s * widths))
    mean = float((view.tokens_per_s * widths).sum() / view.edges[-1])
    fig = _rates_figure(view.edges, done, "rows finished", view.edges, view.tokens_per_s,
                        view.rows_per_s, "the first row entered an engine", view.gaps, mean)
    return Chart("throughput", "Throughput over the run", caption, _png(fig))


def occupancy_chart(tally: Tally, limits: Limits) -> Chart:
    """Rows in each worker's engine over time, as a share of its in-flight limit where the
    manifest records it: an idle or underfilled engine shows at a glance."""
    name, title = "occupancy", "Engine occupancy over the run"
    view = tally.timeline.view(OCCUPANCY_BINS)
    caption = ("Rows in each worker's engine (from each row's started_at to finished_at), "
               "averaged per interval")
    if view is None:
        return Chart(name, title, caption + ".", _placeholder(
            "no row start and finish times in this output (written by an older version)"))
    limit = {w: limits.of(w) for w in view.in_engine}
    known = all(v is not None for v in limit.values())
    if known:
        caption += (", over the worker's in-flight limit (the manifest's this_run.in_flight: "
                    "the job's cap, or what the KV cache holds): 100% is a full engine.")
    else:
        caption += "; the manifest records no in-flight limit for some workers: shown as rows."
    if tally.rollout:
        caption += " A conversation counts from its first turn's submit to its end, tools too."
    series = {w: v / (limit[w] or 1) if known else v for w, v in view.in_engine.items()}
    _, scale = _time_unit(float(view.edges[-1]))
    if len(series) > MAX_WORKER_LINES:
        fig = _occupancy_map(series, view.edges, scale, known, view.gaps)
    else:
        fig, (ax,) = _figure(3.0)
        for i, (worker, values) in enumerate(series.items()):
            ax.stairs(values * (100 if known else 1), view.edges / scale, linewidth=1.6,
                      label=worker, color=WORKER_COLORS[i % len(WORKER_COLORS)],
                      fill=len(series) == 1, alpha=0.35 if len(series) == 1 else 1)
        top = max(float(v.max()) for v in series.values())
        if known:
            ax.axhline(100, color=INK, linestyle="--", linewidth=1, label="in-flight limit")
            ax.set_ylim(0, max(105, top * 100 * 1.3))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}%"))
        else:
            ax.set_ylim(0, max(1, top) * 1.3)
        ax.set_ylabel("of the in-flight limit" if known else "rows in the engine", color=INK)
        ax.legend(frameon=False, fontsize=8.5, loc="lower right", bbox_to_anchor=(1, 1),
                  ncols=min(5, len(series) + 1))
        ax.set_xlim(0, view.edges[-1] / scale)
        _mark_gaps([ax], view.gaps, scale)
        ax.set_xlabel(_since(_time_unit(float(view.edges[-1]))[0],
                             "the first row entered an engine", view.gaps), color=INK)
    return Chart(name, title, caption, _png(fig))


def _occupancy_map(series: dict[str, np.ndarray], edges: np.ndarray, scale: float,
                   known: bool, gaps: list[tuple[float, float]]) -> Figure:
    """Many workers: one row each, coloured by occupancy (a gap or a dark row stands out)."""
    names = list(series)
    height, _ = _bar_rows(len(names))
    fig, (ax,) = _figure(min(height, 12.0))
    grid = np.vstack([series[w] for w in names])
    mesh = ax.pcolormesh(edges / scale, np.arange(len(names) + 1), grid, cmap="viridis",
                         vmin=0, vmax=1 if known else None)
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=7 if len(names) > 24 else 9)
    ax.invert_yaxis()
    ax.grid(False)
    bar = fig.colorbar(mesh, ax=ax, pad=0.01)
    bar.set_label("of the in-flight limit" if known else "rows in the engine", color=INK)
    if known:
        bar.formatter = FuncFormatter(lambda v, _: f"{v:.0%}")
        bar.update_ticks()
    _mark_gaps([ax], gaps, scale)
    ax.set_xlabel(_since(_time_unit(float(edges[-1]))[0], "the first row entered an engine",
                         gaps), color=INK)
    return fig


def tools_chart(tools: Counter[str], failures: Counter[str], rollout: bool) -> Chart:
    ranked = sorted(tools.items(), key=lambda kv: (-kv[1], kv[0]))
    shown, rest = ranked[:TOP_TOOLS], ranked[TOP_TOOLS:]
    if rest:
        shown.append((f"{len(rest)} other names", sum(v for _, v in rest)))
    total = sum(tools.values())
    if rollout:
        caption = (f"{total:,} tool calls run over every turn of every conversation, "
                   f"{sum(failures.values()):,} of them failed.")
    else:
        caption = f"{total:,} tool calls the model made in its answers (not run)."
    if not shown:
        return Chart("tools", "Tool calls by name", caption,
                     _placeholder("no tool calls in this output"))
    height, ylim = _bar_rows(len(shown))
    fig, (ax,) = _figure(height)
    ax.set_ylim(*ylim)
    names = [n for n, _ in shown][::-1]
    counts = np.array([v for _, v in shown][::-1])
    failed = np.array([failures.get(n, 0) for n in names])
    ax.barh(names, counts - failed, color=ROWS if rollout else REASONING, height=0.6,
            label="succeeded")
    if rollout:
        ax.barh(names, failed, left=counts - failed, color=FAILED, height=0.6, label="failed")
        ax.legend(frameon=False, fontsize=8.5, loc="lower right", bbox_to_anchor=(1, 1),
                  ncols=2)
    for y, (c, f) in enumerate(zip(counts, failed)):
        ax.text(c, y, f" {c:,}" + (f" ({f:,} failed)" if f else ""), va="center",
                color=INK, fontsize=9)
    ax.set_xlim(0, counts.max() * 1.3)
    _count_axis(ax, "calls")
    return Chart("tools", "Tool calls by name", caption, _png(fig))


def draw(tally: Tally, limits: Limits) -> list[Chart]:
    return [status_chart(tally.status), tokens_chart(tally.reasoning, tally.answer),
            timing_chart(tally.ttft, tally.latency), throughput_chart(tally),
            occupancy_chart(tally, limits),
            tools_chart(tally.tools, tally.tool_failures, tally.rollout)]
