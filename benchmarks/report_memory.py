"""Benchmark: `thinkbatch report` on 100k- and 1M-row outputs: peak memory stays flat.

Synthetic outputs (no model): parts in the real output schema with realistic columns
(statuses, tokens, times, tool calls; short texts, which the report never reads), done
markers with commit times by `checkpoint.mark_done`, the manifest by
`report.build_manifest`, laid out as a run leaves them. The report runs as the real
command (`flows/cli.py` main) in a child process, which prints its own peak RSS (VmHWM)
as it exits. Not `os.wait4`'s ru_maxrss: Linux carries the parent's peak into a child
across exec, and this parent has just built a million rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from context import HERE, Context
from summary import Goal, row

from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import RunFigures
from thinkbatch.schemas.output import output_schema
from thinkbatch.schemas.plan import InputFile, Plan, Segment, Shard
from thinkbatch.tasks.report.manifest import build_manifest
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage

ROWS_PER_SHARD = 10_000
PART_ROWS = 2_000  # a part per flush, as output.flush_rows makes them
GOAL_RSS_GROWTH = 1.2  # 10x the rows, at most 20% more memory
TOOLS = ["get_weather", "search", "calculator", "lookup_order", "send_email"]
STATUSES = np.array(["ok", "truncated", "parse_error", "engine_error"])
STATUS_P = [0.9, 0.06, 0.02, 0.02]


def _plan(total: int) -> Plan:
    shards = [Shard(shard_id=i, first_row=s, num_rows=min(ROWS_PER_SHARD, total - s),
                    segments=[Segment(file=0, start=s, stop=min(s + ROWS_PER_SHARD, total))])
              for i, s in enumerate(range(0, total, ROWS_PER_SHARD))]
    files = [InputFile(path="synthetic.parquet", size=0, version="0", num_rows=total,
                       row_group_rows=[total], first_row=0)]
    return Plan(files=files, shards=shards, total_rows=total, fingerprint="synthetic",
                fingerprint_parts={})


def _tool_calls(rng: np.random.Generator, n: int) -> pa.Array:
    per_row = rng.choice([0, 0, 0, 1, 2], n)
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    k = int(offsets[-1])
    names = np.array(TOOLS)[rng.integers(0, len(TOOLS), k)]
    calls = pa.StructArray.from_arrays(
        [pa.array([f"functions.{t}:0" for t in names], pa.string()), pa.array(names, pa.string()),
         pa.array(['{"q": "a city"}'] * k, pa.string())], names=["id", "name", "arguments"])
    return pa.ListArray.from_arrays(pa.array(offsets), calls,
                                    mask=pa.array(per_row == 0))


def _part(rng: np.random.Generator, first: int, n: int) -> pa.Table:
    """n rows as a run writes them; engine_error rows have no tokens or times."""
    schema = output_schema()
    status = STATUSES[rng.choice(len(STATUSES), n, p=STATUS_P)]
    failed = status == "engine_error"
    reasoning = rng.lognormal(6, 0.7, n).astype(np.int32)
    answer = rng.lognormal(4, 0.8, n).astype(np.int32)
    ttft = rng.lognormal(0, 0.8, n)
    columns = {
        "id": pa.array([f"q{i:08d}" for i in range(first, first + n)]),
        "row_index": pa.array(np.arange(first, first + n), pa.int64()),
        "sample_index": pa.array(np.zeros(n, np.int32)),
        "reasoning": pa.array(["thinking about it " * 6] * n),
        "answer": pa.array(["the answer"] * n),
        "tool_calls": _tool_calls(rng, n),
        "finish_reason": pa.array(["stop"] * n),
        "status": pa.array(status),
        "prompt_tokens": pa.array(rng.integers(30, 400, n).astype(np.int32), mask=failed),
        "completion_tokens": pa.array(reasoning + answer, mask=failed),
        "reasoning_tokens": pa.array(reasoning, mask=failed),
        "ttft_s": pa.array(ttft, mask=failed),
        "latency_s": pa.array(ttft + rng.lognormal(3, 0.6, n), mask=failed),
    }
    return pa.Table.from_arrays(
        [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema],
        schema=schema)


def build_output(root: Path, total: int) -> dict[str, Any]:
    """A finished output of `total` rows, parts committed 2 s apart."""
    started = time.perf_counter()
    layout = OutputLayout(str(root), Storage())
    plan = _plan(total)
    rng = np.random.default_rng(total)
    markers, at = {}, 1_700_000_000.0
    for shard in plan.shards:
        times = {}
        for first in range(shard.first_row, shard.first_row + shard.num_rows, PART_ROWS):
            part = layout.new_part(shard.shard_id)
            layout.store.write_parquet(part, _part(rng, first, min(
                PART_ROWS, shard.first_row + shard.num_rows - first)))
            at += 2.0
            times[part.rsplit("/", 1)[-1]] = at
        markers[shard.shard_id] = checkpoint.mark_done(layout, shard.shard_id,
                                                       committed_at=times)
    job = load_job(inline={"name": "report-memory", "input": {"path": "synthetic.parquet"},
                           "engine": {"model": "m"}, "output": {"path": str(root)}})
    run = RunFigures(rows_generated=total, resumed=False, wall_s=at - 1_700_000_000.0)
    checkpoint.write_manifest(layout, build_manifest(job, plan, layout, markers, run))
    data = sum(f.stat().st_size for f in (root / "data").iterdir())
    return {"build_s": time.perf_counter() - started, "parts": len(os.listdir(root / "data")),
            "data_mib": data / 2**20}


# Runs `thinkbatch` with the given arguments (none: only its imports), then prints the
# process's peak RSS in KiB from /proc (its own memory since exec, unlike ru_maxrss).
CHILD = """
import atexit, sys
import thinkbatch.flows.cli, thinkbatch.tasks.report.html_report, thinkbatch.tasks.report.charts
def peak():
    status = open("/proc/self/status").read()
    print("VmHWM", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
atexit.register(peak)
if sys.argv[1:]:
    sys.exit(thinkbatch.flows.cli.main(sys.argv[1:]))
"""


def _child(ctx: Context, args: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of one child."""
    started = time.perf_counter()
    proc = subprocess.run([ctx.python, "-c", CHILD, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, int(proc.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024


def run_report(ctx: Context, out: Path) -> dict[str, Any]:
    wall, rss = _child(ctx, ["report", str(out)])
    page = (out / "report" / "report.html").read_text()
    return {"report_s": wall, "peak_rss_mib": rss, "page_kib": len(page) / 1024}


def imports_only(ctx: Context) -> dict[str, Any]:
    """What the command's imports alone cost: the floor under both sizes."""
    wall, rss = _child(ctx, [])
    return {"imports_s": wall, "imports_rss_mib": rss}


def run(ctx: Context) -> dict[str, Any]:
    sizes = [10_000, 100_000] if ctx.quick else [100_000, 1_000_000]
    runs: dict[int, dict[str, Any]] = {}
    for n in sizes:
        out = ctx.work / f"report_{n}"
        runs[n] = {**build_output(out, n), **run_report(ctx, out)}
        shutil.rmtree(out)
    floor = imports_only(ctx)
    small, large = (runs[n] for n in sizes)
    growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    summary = [row(f"report of {n:,} rows ({r['parts']} parts, {r['data_mib']:,.0f} MiB): "
                   "time / peak RSS", f"{r['report_s']:.1f} s / {r['peak_rss_mib']:,.0f} MiB")
               for n, r in runs.items()]
    summary.append(row("the command's imports alone: time / peak RSS",
                       f"{floor['imports_s']:.1f} s / {floor['imports_rss_mib']:,.0f} MiB"))
    summary.append(row(f"peak RSS growth, {sizes[0]:,} -> {sizes[1]:,} rows", f"{growth:.2f}x",
                       Goal(f"<= {GOAL_RSS_GROWTH}x (flat)", growth <= GOAL_RSS_GROWTH)))
    return {"settings": {"sizes": sizes, "rows_per_shard": ROWS_PER_SHARD,
                         "part_rows": PART_ROWS},
            "figures": {"runs": {str(n): r for n, r in runs.items()}, "rss_growth": growth,
                        **floor},
            "summary": summary,
            "notes": ["time and peak RSS of the `thinkbatch report OUTPUT` process: start-up "
                      "(imports of pyarrow, numpy, matplotlib) included",
                      "local disk; texts are short (the report never reads them), so the "
                      "data is smaller than a real run's of as many rows"]}
