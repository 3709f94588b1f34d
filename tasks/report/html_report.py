"""An output's report: one self-contained HTML page (its charts embedded) and the charts
as PNG files beside it, written by `thinkbatch report` and at the end of every run.

The page's figures come from the data, tallied (tasks/report/tally.py), so they can be checked
against the manifest's sums; this run's pace comes from the manifest, the one place it
is known. Written through Storage, so a report sits beside a local or an S3 output.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.tasks.report.tally import Seconds, Tally, TokenCounts, tally_markers, tally_output
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import join

if TYPE_CHECKING:
    from thinkbatch.tasks.report.charts import Chart

log = logging.getLogger("thinkbatch.report")

PAGE = "report.html"
REPORT_FOLDER = "report"


def report_dir(output: str) -> str:
    """Where a run writes its report, and where `thinkbatch report` does by default."""
    return join(output, REPORT_FOLDER)


def _tokens(c: TokenCounts) -> str:
    if not c.n:
        return "–"
    return (f"{c.total:,} (per row: mean {c.mean():,.1f}, median {c.percentile(50):,.0f}, "
            f"p99 {c.percentile(99):,.0f}; {c.n:,} rows)")


def _seconds(s: Seconds) -> str:
    if not s.n:
        return "–"
    return ", ".join(f"{name} {v:,.3f} s" for name, v in (
        ("mean", s.mean()), ("median", s.percentile(50)), ("p90", s.percentile(90)),
        ("p99", s.percentile(99))))


def _per_row(total: int, rows: int) -> str:
    """A total and its mean over the rows that had a count (a failed row has none)."""
    return f"{total:,}" + (f" (per row: mean {total / rows:,.1f}; {rows:,} rows)" if rows else "")


def figures(tally: Tally, manifest: Manifest) -> list[tuple[str, list[tuple[str, str]]]]:
    """The figures table, in sections of (figure, value): the output's from its data,
    then this run's from the manifest."""
    rows = tally.rows
    output = [("rows", f"{rows:,} (of {manifest.input_rows:,} input rows)")]
    output += [(f"status {name}", f"{n:,} ({n / rows:.1%})")
               for name, n in sorted(tally.status.items(), key=lambda kv: (-kv[1], kv[0]))]
    output += [("prompt tokens", _per_row(tally.prompt_tokens, tally.prompted)),
               ("completion tokens", _per_row(tally.completion_tokens, tally.reasoning.n)),
               ("reasoning tokens", _tokens(tally.reasoning)),
               ("answer tokens", _tokens(tally.answer)),
               ("time to first token", _seconds(tally.ttft)),
               ("latency", _seconds(tally.latency))]
    if tally.rollout:
        sums = tally.rollout_sums
        output += [("turns", f"{sums['turns']:,}"),
                   ("tool calls run", f"{sums['tool_calls_total']:,}"),
                   ("tool calls failed", f"{sums['tool_errors']:,}")]
    run = manifest.this_run
    this_run = [("rows generated", f"{run.rows_generated:,}")]
    if run.wall_s is not None:
        this_run.append(("wall time", f"{run.wall_s:,.1f} s"))
    if run.rows_per_s is not None:
        this_run.append(("rows/s", f"{run.rows_per_s:,.2f}"))
    if run.metrics is not None and run.metrics.requests_per_s is not None:
        this_run.append(("engine requests/s", f"{run.metrics.requests_per_s:,.2f}"))
    if run.output_tokens_per_s is not None:
        this_run.append(("output tok/s", f"{run.output_tokens_per_s:,.1f}"))
    if run.engine_load_s is not None:
        this_run.append(("engine load", f"{run.engine_load_s:,.1f} s"))
    if run.resumed is not None:
        this_run.append(("resumed", "yes" if run.resumed else "no"))
    return [("The output (from its data)", output), ("This run (from the manifest)", this_run)]


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2933;
       max-width: 980px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 2em; }
.meta { color: #616e7c; } code { font-size: .92em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { text-align: left; padding: .25em 1.2em .25em 0; border-bottom: 1px solid #e4e7eb;
         vertical-align: top; }
th.section { padding-top: 1em; font-size: 1.02em; }
td:first-child { color: #52606d; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #e4e7eb; }
figcaption { color: #616e7c; font-size: .92em; }
"""


def page(manifest: Manifest, output: str, tally: Tally, drawn: list[Chart]) -> str:
    """The whole report as one HTML document with nothing to fetch."""
    e = html.escape
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = []
    for section, items in figures(tally, manifest):
        table.append(f'<tr><th class="section" colspan="2">{e(section)}</th></tr>')
        table += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in items]
    sections = [
        f'<section id="{c.name}"><h2>{e(c.title)}</h2><figure>'
        f'<img alt="{e(c.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(c.png).decode()}"><figcaption>{e(c.caption)}</figcaption>'
        f"</figure></section>" for c in drawn]
    contents = " · ".join(f'<a href="#{c.name}">{e(c.title)}</a>' for c in drawn)
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>thinkbatch report: {e(manifest.job)}</title><style>{STYLE}</style></head>",
        f"<body><h1>thinkbatch report: {e(manifest.job)}</h1>",
        f'<p class="meta">Output <code>{e(output)}</code> · {tally.rows:,} rows · '
        f"written {when} by thinkbatch {e(manifest.versions.get('thinkbatch') or '')}</p>",
        f"<p>{contents}</p>",
        "<h2>Figures</h2>", "<table>", *table, "</table>",
        "<p class=\"meta\">Percentiles of times are read from log-spaced bins (within "
        "0.6%), as the manifest's are.</p>",
        *sections, "</body></html>"])


def write_report(layout: OutputLayout, to: str | None = None) -> str:
    """Tally a finished output, draw its charts, write the page and the PNGs into `to`
    (default: the output's report folder); returns the page's path. FileNotFoundError
    for an output with no manifest (not finished)."""
    return _draw(layout, to or report_dir(layout.root), checkpoint.read_manifest(layout),
                 tally_output(layout))


def _draw(layout: OutputLayout, folder: str, manifest: Manifest, tally: Tally) -> str:
    """The charts and the page into `folder`. matplotlib loads here, when a report is
    drawn, not when a run starts."""
    from thinkbatch.tasks.report import charts

    drawn = charts.draw(tally, charts.Limits.of_run(manifest.this_run))
    for chart in drawn:
        layout.store.write_atomic(join(folder, f"{chart.name}.png"), chart.png)
    target = join(folder, PAGE)
    layout.store.write_atomic(target, page(manifest, layout.root, tally, drawn).encode())
    return target


def write_report_of_run(layout: OutputLayout, manifest: Manifest,
                        markers: Iterable[ShardStats]) -> str | None:
    """The report at the end of a run, from the manifest finalize wrote and the markers it
    read (at 100k shards on S3, reading them again is minutes). A failure to draw or write
    it is a warning, never a failed job (the data and the manifest are already written)."""
    try:
        return _draw(layout, report_dir(layout.root), manifest, tally_markers(layout, markers))
    except Exception as e:
        log.warning("the report was not written: %s: %s", type(e).__name__, e)
        return None
