"""What a finished run says: the CLI's closing summary, the figures table (the terminal's
and the Prefect table artifact's), sample rows of each output shape, and the Prefect
markdown summary."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.manifest import Manifest, RunFigures, ShardStats
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


Getter = Callable[[RunFigures], Any]


def _metric(name: str, attr: str | None = None) -> Getter:
    def get(run: RunFigures) -> Any:
        value = getattr(run.metrics, name) if run.metrics is not None else None
        return getattr(value, attr) if attr is not None and value is not None else value
    return get


def _figures(manifest: Manifest) -> list[tuple[str, Any, Getter]]:
    """(figure, the output's value or None, this run's or a worker's) in table order."""
    runs = [manifest.this_run, *(manifest.this_run.workers or {}).values()]
    statuses = sorted(set(manifest.status_counts).union(
        *(r.metrics.status for r in runs if r.metrics is not None)))
    figures: list[tuple[str, Any, Getter]] = [("rows", manifest.rows, lambda r: r.rows_generated)]
    figures += [(f"rows {s}", manifest.status_counts.get(s, 0),
                 lambda r, s=s: r.metrics.status.get(s, 0) if r.metrics else None)
                for s in statuses]
    figures += [("requests", None, _metric("requests")),
                ("requests/s", None, _metric("requests_per_s")),
                ("rows/s", None, lambda r: r.rows_per_s),
                ("output tok/s", None, lambda r: r.output_tokens_per_s)]
    figures += [(f"{label} {word} (s)", None, _metric(name, attr))
                for name, label in (("ttft_s", "TTFT"), ("latency_s", "latency"))
                for attr, word in (("mean", "mean"), ("p50", "median"), ("p90", "p90"),
                                   ("p99", "p99"))]
    totals = {"prompt": manifest.prompt_tokens, "completion": manifest.completion_tokens}
    for kind in ("prompt", "completion", "reasoning", "answer"):
        figures += [(f"{kind} tokens total", totals.get(kind), _metric(f"{kind}_tokens", "total")),
                    (f"{kind} tokens mean", None, _metric(f"{kind}_tokens", "mean"))]
    figures += [("engine load (s)", None, lambda r: r.engine_load_s),
                ("generation (s)", None, lambda r: r.generation_s),
                ("wall (s)", None, lambda r: r.wall_s),
                ("engine restarts", None, lambda r: r.engine_restarts),
                ("resumed", None, lambda r: r.resumed)]
    return figures


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def figure_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """The manifest's figures as table rows: the output's totals, this run's (its new
    rows only) and, in a scale-out run, each worker's, by its flow run's name. The
    Prefect table artifact and the terminal's table."""
    workers = manifest.this_run.workers or {}
    return [{"figure": label, "output": _rounded(output),
             "this run": _rounded(get(manifest.this_run)),
             **{name: _rounded(get(figures)) for name, figures in workers.items()}}
            for label, output, get in _figures(manifest)]


# The seed's table on the terminal: the rest of the figures are in the lines above it.
TERMINAL_FIGURES = ("requests/s", "output tok/s", "TTFT mean (s)", "TTFT median (s)",
                    "latency median (s)", "latency p90 (s)", "latency p99 (s)",
                    "reasoning tokens mean", "answer tokens mean")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def text_table(rows: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    """Rows of dicts as aligned text: the first column left, the others right."""
    cells = [list(rows[0])] + [[_cell(v) if i else str(v) for i, v in enumerate(r.values())]
                               for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def summary(manifest: Manifest) -> str:
    run = manifest.this_run
    lines = [
        f"thinkbatch: {manifest.rows:,} rows written to {manifest.data}",
        "  status: " + ", ".join(f"{k}={v:,}" for k, v in manifest.status_counts.items()),
        f"  tokens: {manifest.prompt_tokens:,} prompt, {manifest.completion_tokens:,} completion",
        f"  this run: {run.rows_generated:,} rows in {run.wall_s:.1f}s "
        f"({run.rows_per_s:,.1f} rows/s, {run.output_tokens_per_s:,.0f} out tok/s"
        + (f"; engine load {run.engine_load_s:.1f}s)" if run.engine_load_s is not None else ")"),
    ]
    if manifest.turns is not None:
        lines.append(f"  rollouts: {manifest.turns:,} turns, {manifest.tool_calls_total:,} "
                     f"tool calls run, {manifest.tool_errors:,} failed")
    if retry := manifest.retry:
        lines.append(f"  retry of {retry.source}: {retry.rows_retried:,} rows "
                     f"({', '.join(retry.statuses)}) regenerated, the others copied")
    if run.metrics is not None:
        lines += text_table([{k: v for k, v in r.items() if k != "output"}
                             for r in figure_rows(manifest) if r["figure"] in TERMINAL_FIGURES],
                            indent="    ")
    return "\n".join(lines)


def sample_rows(job: JobSpec, n: int, width: int = 100) -> list[dict[str, Any]]:
    """A few rows of the first part, clipped: what a newcomer looks at to see reasoning,
    answers and tool calls side by side. One row of each output shape (an answer, tool
    calls, neither) comes before any repeats, whatever order rows finished in; ok rows
    come before others within each pass."""
    layout = OutputLayout(job.output.path, Storage(job.storage))
    parts = layout.all_parts()
    if n <= 0 or not parts:
        return []
    cols = ["id", "status", "reasoning", "answer", "tool_calls"]
    table = layout.store.read_columns(parts[0], cols)
    is_ok = pc.equal(table.column("status"), "ok")
    rows = pa.concat_tables([table.filter(is_ok), table.filter(pc.invert(is_ok))]).to_pylist()
    shapes: set[tuple[bool, bool]] = set()
    first, rest = [], []
    for r in rows:
        shape = (r["answer"] is not None, bool(r["tool_calls"]))
        (rest if shape in shapes else first).append(r)
        shapes.add(shape)
    return [_clipped(r, width) for r in (first + rest)[:n]]


def _clipped(row: dict[str, Any], width: int) -> dict[str, Any]:
    return {k: (v[:width] + "…" if isinstance(v, str) and len(v) > width else v)
            for k, v in row.items()}


SAMPLE_COLUMNS = ["id", "status", "error", "reasoning", "answer", "tool_calls",
                  "num_turns", "tool_calls_total", "tool_errors"]
SAMPLE_PARTS = 8  # parts read at most to find a row of each shape


def _shape(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"failed: {row['status']}"
    if (row.get("num_turns") or 1) > 1:
        return "rollout"
    return "tool calls" if row["tool_calls"] else "answer"


def sample_shapes(layout: OutputLayout, markers: dict[int, ShardStats],
                  width: int = 300) -> dict[str, dict[str, Any]]:
    """One row of each output shape there is (an answer, tool calls, a rollout of several
    turns, a failed row of each non-ok status, with its reason), clipped. The markers'
    counts say which shards hold failed rows, so a few parts are read, not the output."""
    done = [markers[s] for s in sorted(markers)]
    failed = sorted({s for m in done for s in m.status if s != "ok"})
    holding = [next(m for m in done if m.status.get(status)) for status in failed]
    parts = [p for m in done[:1] + holding for p in m.parts]
    found: dict[str, dict[str, Any]] = {}
    for name in list(dict.fromkeys(parts))[:SAMPLE_PARTS]:
        file = layout.store.open_parquet(f"{layout.data}/{name}")
        columns = [c for c in SAMPLE_COLUMNS if c in file.schema_arrow.names]
        for row in file.read(columns=columns).to_pylist():
            shown = {k: v for k, v in row.items() if v is not None}
            found.setdefault(_shape(row), _clipped(shown, width))
        if all(f"failed: {s}" in found for s in failed) and "answer" in found:
            break
    return dict(sorted(found.items(), key=lambda kv: kv[0].startswith("failed")))


def markdown_summary(manifest: Manifest, layout: OutputLayout,
                     samples: dict[str, dict[str, Any]], report_page: str | None) -> str:
    """The run as a Prefect markdown artifact: where the output and its report are, rows
    by status, the figures, a sample row of each shape."""
    if report_page is None:
        page = "not written (the run's log says why; `thinkbatch report` writes it)"
    elif "://" in report_page:
        page = f"`{report_page}`"
    else:
        page = f"[`{report_page}`](file://{os.path.abspath(report_page)})"
    run = manifest.this_run
    lines = [f"# {manifest.job}: {manifest.rows:,} rows", "",
             f"- output: `{manifest.data}` (manifest `{layout.manifest}`)",
             f"- report with charts: {page}",
             f"- this run: {run.rows_generated:,} rows generated in {run.wall_s or 0:.1f} s"
             + (" (resumed)" if run.resumed else ""), "",
             "| status | rows | share |", "|---|---:|---:|"]
    lines += [f"| {s} | {n:,} | {n / max(manifest.rows, 1):.1%} |"
              for s, n in manifest.status_counts.items()]
    rows = figure_rows(manifest)
    lines += ["", "## Figures", "", "| " + " | ".join(rows[0]) + " |",
              "|---|" + "---:|" * (len(rows[0]) - 1)]
    lines += ["| " + " | ".join(_cell(v) if i else str(v) for i, v in enumerate(r.values())) + " |"
              for r in rows]
    lines += ["", "## Sample rows"]
    for shape, row in samples.items():
        lines += ["", f"**{shape}**", "", "```json",
                  json.dumps(row, ensure_ascii=False, indent=1), "```"]
    return "\n".join(lines) + "\n"
