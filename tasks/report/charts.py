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
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from thinkbatch.schemas.output import Status
from thinkbatch.tasks.report.tally import SECOND_EDGES, PartCommit, Seconds, Tally, TokenCounts

DPI = 110
WIDTH_IN = 8.4
HIST_BINS = 40
TAIL_PERCENTILE = 99.9  # token histograms end here; longer rows join the last bar
TIME_BINS = 60
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


@dataclass(frozen=True)
class Chart:
    name: str  # the PNG's file name, without .png
    title: str
    caption: str
    png: bytes


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


def throughput_chart(commits: list[PartCommit], untimed_parts: int) -> Chart:
    caption = ("From the commit time of each part: the rows and output tokens committed "
               "per interval, from the first commit on.")
    if untimed_parts:
        caption += (f" {untimed_parts:,} parts have no recorded commit time (written by an "
                    "older version or by a run that was killed) and are left out.")
    span = commits[-1].at - commits[0].at if commits else 0.0
    if len(commits) < 2 or span <= 0:
        return Chart("throughput", "Throughput over the run", caption,
                     _placeholder("fewer than two commit times: no throughput over time to show"))
    fig, (top, bottom) = _figure(4.8, rows=2, sharex=True, height_ratios=[1, 1.2])
    unit, scale = _time_unit(span)
    at = np.array([c.at - commits[0].at for c in commits])
    rows = np.array([c.rows for c in commits])
    tokens = np.array([c.output_tokens for c in commits])
    top.step(np.append(0, at) / scale, np.append(0, np.cumsum(rows)), where="post",
             color=ROWS, linewidth=1.6)
    top.set_ylabel("rows committed", color=INK)
    top.set_ylim(bottom=0)
    _thousands(top)
    bins = int(np.clip(len(commits) // 2, 1, TIME_BINS))
    edges = np.linspace(0, span, bins + 1)
    # The first part's rows were made before the first commit, which starts the clock.
    rate_tokens = np.histogram(at[1:], edges, weights=tokens[1:])[0] / (span / bins)
    rate_rows = np.histogram(at[1:], edges, weights=rows[1:])[0] / (span / bins)
    bottom.stairs(rate_tokens, edges / scale, fill=True, color=TOKENS, alpha=0.8,
                  label="output tok/s")
    bottom.set_ylabel("output tok/s", color=INK)
    bottom.set_ylim(0, max(rate_tokens.max(), 1) * 1.25)  # room for the legend
    _thousands(bottom)
    rows_ax = bottom.twinx()
    rows_ax.stairs(rate_rows, edges / scale, color=ROWS, linewidth=1.6, label="rows/s")
    rows_ax.set_ylabel("rows/s", color=ROWS)
    rows_ax.set_ylim(0, max(rate_rows.max(), 1) * 1.25)
    rows_ax.tick_params(colors=ROWS, labelsize=9)
    rows_ax.spines[["top"]].set_visible(False)
    handles = bottom.get_legend_handles_labels()[0] + rows_ax.get_legend_handles_labels()[0]
    bottom.legend(handles, ["output tok/s", "rows/s"], frameon=False, fontsize=8.5,
                  loc="upper left", ncols=2)
    bottom.set_xlabel(f"{unit} since the first commit", color=INK)
    for ax in (top, bottom):
        ax.set_xlim(0, span / scale)
    return Chart("throughput", "Throughput over the run", caption, _png(fig))


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


def draw(tally: Tally) -> list[Chart]:
    return [status_chart(tally.status), tokens_chart(tally.reasoning, tally.answer),
            timing_chart(tally.ttft, tally.latency),
            throughput_chart(tally.commits, tally.untimed_parts),
            tools_chart(tally.tools, tally.tool_failures, tally.rollout)]
