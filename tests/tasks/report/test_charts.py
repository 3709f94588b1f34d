"""The report with charts (tasks/report/tally.py, tasks/report/charts.py, tasks/report/html_report.py) on
outputs written the way a run writes them: parts in the real output schema, done markers
by `checkpoint.mark_done`, the manifest by `report.build_manifest`."""

from __future__ import annotations

import base64
import json
import random
import re
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import InFlightFigures, Manifest, RunFigures
from thinkbatch.schemas.output import OutputRow, output_schema
from thinkbatch.tasks.report import html_report
from thinkbatch.tasks.report.manifest import build_manifest
from thinkbatch.tasks.report.tally import Seconds, TokenCounts, tally_output
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

CHART_TITLES = ["Rows by status", "Reasoning and answer tokens",
                "TTFT and latency distributions", "Throughput over the run",
                "Engine occupancy over the run", "Tool calls by name"]
CHART_NAMES = ["status", "tokens", "timing", "throughput", "occupancy", "tools"]
TOOLS = ["get_weather", "search_flights", "calculator"]
START = 1_700_000_000.0


def _output_row(**values: Any) -> OutputRow:
    """An OutputRow with every column not given null."""
    return OutputRow(**{**{f.name: None for f in fields(OutputRow)}, **values})


def _row(i: int, rng: random.Random, rollout: bool, failed: bool) -> dict[str, Any]:
    if failed:
        return _output_row(id=f"q{i:05d}", row_index=i, sample_index=0, status="engine_error",
                         error="engine died").as_dict(rollout)
    status = rng.choice(["ok"] * 8 + ["truncated", "parse_error"])
    reasoning = int(rng.lognormvariate(5, 0.6))
    answer = int(rng.lognormvariate(3.5, 0.8))
    calls = [{"id": f"functions.{n}:0", "name": n, "arguments": "{}"}
             for n in rng.sample(TOOLS, rng.choice([0, 0, 1, 2]))]
    row = _output_row(id=f"q{i:05d}", row_index=i, sample_index=0, status=status,
                    reasoning="r", answer="a", tool_calls=calls or None, finish_reason="stop",
                    prompt_tokens=40 + i % 7, completion_tokens=reasoning + answer,
                    reasoning_tokens=reasoning, ttft_s=rng.lognormvariate(-0.5, 0.5),
                    latency_s=rng.lognormvariate(2, 0.4))
    if rollout:
        turns = [{"tool_calls": calls,
                  "tool_results": [{"call_id": c["id"], "name": c["name"], "content": "x",
                                    "error": "boom" if rng.random() < 0.2 else None,
                                    "latency_s": 0.1} for c in calls],
                  "completion_tokens": reasoning, "finish_reason": "stop"},
                 {"answer": "a", "completion_tokens": answer, "finish_reason": "stop"}]
        row.turns, row.num_turns = turns, 2
        row.tool_calls_total = len(calls)
        row.tool_errors = sum(r["error"] is not None for r in turns[0]["tool_results"])
        row.tool_calls = None  # the last turn answered
    return row.as_dict(rollout)


def _spans(batch: list[dict[str, Any]], after: float, at: float) -> None:
    """Rows that finished between two commits, each in the engine for its latency."""
    for row in batch:
        if row["latency_s"] is not None:
            finished = after + (at - after) * (row["row_index"] % 7 + 1) / 8
            row["started_at"] = datetime.fromtimestamp(finished - row["latency_s"],
                                                       timezone.utc)
            row["finished_at"] = datetime.fromtimestamp(finished, timezone.utc)
            row["worker"] = "w0"


def write_output(tmp_path: Path, *, rows: int = 300, rows_per_shard: int = 100,
                 part_rows: int = 25, rollout: bool = False, failed: bool = False,
                 out: str | None = None,
                 row_times: bool = True) -> tuple[JobSpec, OutputLayout, Manifest]:
    """A finished output: parts committed a few seconds apart, markers, a manifest.
    Without `row_times`, as an older version wrote it: no start, finish or worker."""
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(rows))
    job_raw: dict[str, Any] = {
        "name": "charts", "input": {"path": str(inputs)}, "engine": {"model": "m"},
        "shards": {"rows_per_shard": rows_per_shard},
        "output": {"path": out or str(tmp_path / "out")}}
    if rollout:
        job_raw["rollout"] = {"tools": [{"recorded": {"column": "results"}}]}
    job = load_job(inline=job_raw)
    layout = OutputLayout(job.output.path, Storage(job.storage))
    plan, _ = checkpoint.open_plan(layout, make_plan(job, layout.store))
    schema = output_schema(rollout=rollout, row_times=row_times)
    rng = random.Random(7)
    markers, at = {}, START
    for shard in plan.shards:
        times = {}
        for start in range(shard.first_row, shard.first_row + shard.num_rows, part_rows):
            part = layout.new_part(shard.shard_id)
            batch = [_row(i, rng, rollout, failed) for i in
                     range(start, min(start + part_rows, shard.first_row + shard.num_rows))]
            after, at = at, at + rng.uniform(2, 6)
            _spans(batch, after, at)
            layout.store.write_parquet(part, pa.Table.from_pylist(batch, schema=schema))
            times[part.rsplit("/", 1)[-1]] = at
        markers[shard.shard_id] = checkpoint.mark_done(layout, shard.shard_id,
                                                       committed_at=times)
    run = RunFigures(rows_generated=rows, output_tokens=sum(m.completion_tokens
                                                            for m in markers.values()),
                     resumed=False, wall_s=at - START + 9, rows_per_s=rows / (at - START),
                     output_tokens_per_s=123.456, engine_load_s=4.2,
                     in_flight=InFlightFigures(cap=64, expected_tokens_per_row=512, limit=64))
    manifest = build_manifest(job, plan, layout, markers, run)
    checkpoint.write_manifest(layout, manifest)
    return job, layout, manifest


def _page(path: Path) -> str:
    return path.read_text()


def _table(page: str) -> dict[str, str]:
    return dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", page))


def test_page_names_every_chart_and_its_figures_are_the_manifests(tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path)

    target = html_report.write_report(layout)

    assert target == str(tmp_path / "out" / "report" / "report.html")
    page = _page(Path(target))
    for title in CHART_TITLES:
        assert f"<h2>{title}</h2>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(CHART_TITLES)
    for name, png in zip(CHART_NAMES, images):
        assert (tmp_path / "out" / "report" / f"{name}.png").read_bytes() == base64.b64decode(png)
    figures = _table(page)
    rows = manifest.rows
    assert figures["rows"] == f"{rows:,} (of {manifest.input_rows:,} input rows)"
    assert {k.removeprefix("status "): int(v.split(" ")[0].replace(",", ""))
            for k, v in figures.items() if k.startswith("status ")} == manifest.status_counts
    assert figures["prompt tokens"].startswith(f"{manifest.prompt_tokens:,} ")
    assert figures["completion tokens"].startswith(f"{manifest.completion_tokens:,} ")
    run = manifest.this_run
    assert figures["rows/s"] == f"{run.rows_per_s:,.2f}"
    assert figures["output tok/s"] == "123.5"
    assert figures["engine load"] == "4.2 s" and figures["resumed"] == "no"


def test_tally_equals_the_manifest_and_the_rows(tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path, rollout=True)
    table = pa.concat_tables(layout.store.open_parquet(p).read() for p in layout.all_parts())

    tally = tally_output(layout)

    assert dict(tally.status) == manifest.status_counts
    assert (tally.prompt_tokens, tally.completion_tokens) == (manifest.prompt_tokens,
                                                              manifest.completion_tokens)
    assert dict(tally.rollout_sums) == {"turns": manifest.turns,
                                        "tool_calls_total": manifest.tool_calls_total,
                                        "tool_errors": manifest.tool_errors}
    assert tally.reasoning.total == sum(table.column("reasoning_tokens").to_pylist())
    ttft = sorted(table.column("ttft_s").to_pylist())
    assert tally.ttft.mean() == pytest.approx(sum(ttft) / len(ttft))
    assert tally.ttft.percentile(50) == pytest.approx(ttft[len(ttft) // 2], rel=0.01)
    assert len(tally.commits) == 12 and tally.untimed_parts == 0
    assert sum(c.rows for c in tally.commits) == manifest.rows


def test_rollouts_show_tool_calls_run_by_name(tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path, rollout=True)

    tally = tally_output(layout)
    page = _page(Path(html_report.write_report(layout)))

    assert set(tally.tools) == set(TOOLS)
    assert sum(tally.tools.values()) == manifest.tool_calls_total
    assert sum(tally.tool_failures.values()) == manifest.tool_errors > 0
    assert f"{manifest.tool_calls_total:,} tool calls run over every turn" in page
    assert _table(page)["tool calls failed"] == f"{manifest.tool_errors:,}"


def test_single_turn_tool_calls_are_counted_by_name(tmp_path: Path) -> None:
    _, layout, _ = write_output(tmp_path)
    table = pa.concat_tables(layout.store.open_parquet(p).read() for p in layout.all_parts())
    names = [c["name"] for calls in table.column("tool_calls").to_pylist() for c in calls or []]

    tally = tally_output(layout)

    assert dict(tally.tools) == {n: names.count(n) for n in set(names)}
    assert not tally.tool_failures


def test_an_output_of_failed_rows_still_renders_every_chart(tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path, rows=40, rows_per_shard=40, part_rows=40,
                                       failed=True)

    page = _page(Path(html_report.write_report(layout, to=str(tmp_path / "elsewhere"))))

    assert manifest.status_counts == {"engine_error": 40}
    for title in CHART_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert _table(page)["time to first token"] == "–"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == sorted(
        ["report.html"] + [f"{n}.png" for n in CHART_NAMES])


def test_a_failing_report_at_the_end_of_a_run_is_a_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    _, layout, manifest = write_output(tmp_path)
    markers = checkpoint.read_markers(layout, [0, 1, 2])
    for part in (tmp_path / "out" / "data").iterdir():  # the parts are gone: nothing to tally
        part.unlink()

    assert html_report.write_report_of_run(layout, manifest, markers.values()) is None
    assert "the report was not written" in caplog.text


def test_report_on_an_s3_output(tmp_path: Path, s3) -> None:
    bucket = s3.bucket("report-out")
    _, layout, manifest = write_output(tmp_path, out=f"s3://{bucket}/runs/a")

    target = html_report.write_report(layout)

    assert target == f"s3://{bucket}/runs/a/report/report.html"
    assert {k for k in s3.keys(bucket, "runs/a/report/")} == {
        f"runs/a/report/{n}" for n in ["report.html"] + [f"{c}.png" for c in CHART_NAMES]}
    page = layout.store.read_bytes(target).decode()
    assert _table(page)["completion tokens"].startswith(f"{manifest.completion_tokens:,} ")


def test_token_counts_and_seconds_are_exact_where_they_can_be() -> None:
    tokens = TokenCounts()
    tokens.add(np.array([0, 5, 5]))
    tokens.add(np.array([100]))
    assert (tokens.n, tokens.total, tokens.percentile(50), tokens.percentile(100)) == (
        4, 110, 5.0, 100.0)
    seconds = Seconds()
    seconds.add(np.array([0.0, 2.0, 3.0, 1e6]))
    assert seconds.n == 4 and seconds.mean() == pytest.approx((5 + 1e6) / 4)
    assert seconds.percentile(50) == pytest.approx(2.0, rel=0.006)
    assert seconds.percentile(100) == 1e6  # within the exact extremes


def test_markers_keep_each_parts_commit_time(tmp_path: Path) -> None:
    _, layout, _ = write_output(tmp_path, rows=50, rows_per_shard=50)
    marker = json.loads(layout.store.read_bytes(layout.done_marker(0)))
    assert sorted(marker["committed_at"]) == marker["parts"]
    older = {k: v for k, v in marker.items() if k != "committed_at"}
    layout.store.write_atomic(layout.done_marker(0), json.dumps(older).encode())

    tally = tally_output(layout)

    assert tally.untimed_parts == 2 and not tally.commits


@pytest.mark.parametrize("lo, hi", [(0.3, 0.95), (0.25, 2.0), (0.6, 1.4), (2.0, 40.0),
                                    (300.0, 5000.0), (0.05, 30.0), (3000.0, 2e5)])
def test_a_time_axis_labels_apart_whatever_it_spans(lo: float, hi: float) -> None:
    """The latency axis of a demo's 300 rows read "700 ms800 ms900 ms": every label drawn
    within the axis stands clear of the next, and there are at least two."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from thinkbatch.tasks.report import charts

    seconds = Seconds()
    seconds.add(np.geomspace(lo, hi, 300))
    fig, (_, ax) = charts._figure(3.2, cols=2)
    charts._time_hist(ax, seconds, charts.LATENCY, "latency")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    left, right = ax.get_xlim()
    drawn = sorted((label.get_window_extent(renderer).x0, label.get_window_extent(renderer).x1,
                    label.get_text()) for label, at in zip(ax.get_xticklabels(), ax.get_xticks())
                   if label.get_text() and left <= at <= right)
    assert len(drawn) >= 2, drawn
    assert all(b[0] > a[1] for a, b in zip(drawn, drawn[1:])), drawn


def _timed_output(tmp_path: Path, spans: list[tuple[float, float, int, str]],
                  commit_every: int, run: RunFigures) -> OutputLayout:
    """One shard of rows with the given (start, finish, output tokens, worker), committed
    `commit_every` rows a part, each part when its last row finished."""
    job = load_job(inline={"name": "spans", "engine": {"model": "m"},
                           "input": {"path": str(write_prompts(tmp_path / "in.parquet",
                                                               prompt_rows(len(spans))))},
                           "shards": {"rows_per_shard": len(spans)},
                           "output": {"path": str(tmp_path / "out")}})
    layout = OutputLayout(job.output.path, Storage(job.storage))
    plan, _ = checkpoint.open_plan(layout, make_plan(job, layout.store))
    order = sorted(range(len(spans)), key=lambda i: spans[i][1])
    times = {}
    for k in range(0, len(order), commit_every):
        rows = [_output_row(id=f"q{i:05d}", row_index=i, sample_index=0, status="ok",
                            finish_reason="stop", completion_tokens=spans[i][2],
                            latency_s=spans[i][1] - spans[i][0],
                            started_at=datetime.fromtimestamp(spans[i][0], timezone.utc),
                            finished_at=datetime.fromtimestamp(spans[i][1], timezone.utc),
                            worker=spans[i][3]).as_dict()
                for i in order[k:k + commit_every]]
        part = layout.new_part(0)
        layout.store.write_parquet(part, pa.Table.from_pylist(rows, schema=output_schema()))
        times[part.rsplit("/", 1)[-1]] = max(spans[i][1] for i in order[k:k + commit_every])
    markers = {0: checkpoint.mark_done(layout, 0, committed_at=times)}
    checkpoint.write_manifest(layout, build_manifest(job, plan, layout, markers, run))
    return layout


def _steady(rows: int, every_s: float, length_s: float, tokens: int, worker: str = "w0",
            at: float = START) -> list[tuple[float, float, int, str]]:
    """A row entering every `every_s`, each in the engine `length_s`: once it is full,
    length_s / every_s rows in flight and a steady tokens / every_s output tok/s."""
    return [(at + i * every_s, at + i * every_s + length_s, tokens, worker) for i in range(rows)]


def test_the_rate_peaks_at_the_engines_rate_though_parts_commit_in_bursts(
        tmp_path: Path) -> None:
    """Rows enter and leave at an even pace, 800 output tok/s; parts of 60 rows commit in
    bursts (a commit-time rate read 60 rows' tokens at each commit). The chart's rate,
    each row's tokens spread over its span, peaks at the engine's rate."""
    from thinkbatch.tasks.report import charts

    layout = _timed_output(tmp_path, _steady(600, 0.5, 20.0, 400), commit_every=60,
                           run=RunFigures(rows_generated=600))

    tally = tally_output(layout)
    view = tally.timeline.view(charts.TIME_BINS)

    assert view is not None and tally.timeline.rows == 600 and tally.unspanned == 0
    assert view.tokens_per_s.max() == pytest.approx(800, rel=0.03)
    assert (view.tokens_per_s * np.diff(view.edges)).sum() == pytest.approx(600 * 400)
    assert view.edges[-1] == pytest.approx(599 * 0.5 + 20, abs=0.1) and not view.gaps
    page = _page(Path(html_report.write_report(layout)))
    assert "Each row&#x27;s output tokens spread evenly over its time in the engine" in page


def test_occupancy_shows_each_workers_engine_against_its_limit(tmp_path: Path) -> None:
    """w0 holds 8 rows (its limit) all along; w1 holds 4 of its 8, then idles: each worker's
    rows in its engine, over the limit the manifest names it with."""
    from thinkbatch.tasks.report import charts

    spans = _steady(400, 0.5, 4.0, 100, "w0") + _steady(100, 1.0, 4.0, 100, "w1")
    limit = InFlightFigures(cap=8, expected_tokens_per_row=100, limit=8)
    run = RunFigures(rows_generated=500, workers={
        w: RunFigures(in_flight=limit) for w in ("w0", "w1")})
    layout = _timed_output(tmp_path, spans, commit_every=50, run=run)

    view = tally_output(layout).timeline.view(40)
    limits = charts.Limits.of_run(run)

    assert view is not None and sorted(view.in_engine) == ["w0", "w1"]
    assert (limits.of("w0"), limits.of("w1"), limits.of("earlier")) == (8, 8, 8)
    middle = (view.edges[:-1] > 10) & (view.edges[1:] < 90)  # w1 full, ramps left out
    late = (view.edges[:-1] > 110) & (view.edges[1:] < 195)  # w1 gone, w0 not ending
    assert view.in_engine["w0"][middle | late] == pytest.approx(8, rel=0.03)
    assert view.in_engine["w1"][middle] == pytest.approx(4, rel=0.03)
    assert not view.in_engine["w1"][late].any()
    page = _page(Path(html_report.write_report(layout)))
    assert "over the worker&#x27;s in-flight limit" in page


def test_time_with_no_row_in_any_engine_is_cut_from_the_axis(tmp_path: Path) -> None:
    """A run stopped and resumed a day later: the day is cut out, said where and how long."""
    day = 86_400.0
    spans = _steady(100, 0.5, 5.0, 50) + _steady(100, 0.5, 5.0, 50, at=START + day)
    layout = _timed_output(tmp_path, spans, commit_every=25, run=RunFigures())

    view = tally_output(layout).timeline.view(60)

    assert view is not None
    ((at, length),) = view.gaps
    active = 99 * 0.5 + 5  # each run's; a day's grid has bins of 64 s
    assert 2 * active <= view.edges[-1] <= 2 * active + 4 * 64
    assert active <= at <= active + 2 * 64
    assert length == pytest.approx(day - active, abs=2 * 64)


def test_an_output_written_before_rows_kept_their_times_falls_back_to_commits(
        tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path, row_times=False)

    tally = tally_output(layout)
    page = _page(Path(html_report.write_report(layout)))

    assert tally.timeline.view(60) is None and len(tally.commits) == 12
    assert tally.unspanned == manifest.rows - manifest.status_counts.get("engine_error", 0)
    assert "From the commit time of each part" in page
    assert "no row start and finish times in this output" not in page  # a placeholder's PNG
    assert (tmp_path / "out" / "report" / "occupancy.png").exists()


def test_the_timeline_is_exact_in_any_order_and_as_it_coarsens() -> None:
    """Parts come in any order and the grid doubles its bins as spans widen: every token
    stays counted, and the same rows give the same bins."""
    from thinkbatch.tasks.report.timeline import MAX_BINS, Timeline

    rng = np.random.default_rng(3)
    starts = START + rng.uniform(0, 3600, 5000)
    finishes = starts + rng.lognormal(2, 1, 5000)
    tokens = rng.integers(1, 2000, 5000)
    workers = rng.integers(0, 3, 5000)
    names = ["a", "b", "c"]
    one, chunked = Timeline(), Timeline()
    one.add(starts, finishes, tokens, workers, names)
    for k in rng.permutation(50):  # short spans first: the grid starts fine and coarsens
        cut = slice(k * 100, k * 100 + 100)
        chunked.add(starts[cut], finishes[cut], tokens[cut], workers[cut], names)

    assert len(chunked.tokens) <= MAX_BINS and chunked.width == one.width
    assert chunked.tokens.sum() == pytest.approx(tokens.sum())
    assert chunked.tokens == pytest.approx(one.tokens)
    busy = sum(chunked.busy.values())
    assert busy.sum() == pytest.approx((finishes - starts).sum())
