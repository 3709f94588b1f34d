"""Benchmark 3: the host path alone: read -> render -> parse -> commit, no model.

The replay engine takes each row's completion from a `raw_text` column of realistic
Kimi-K2-Thinking outputs, so every row goes through the kimi_k2 parsers and the
committer exactly as generated rows do. One core (taskset -c 0): on a GPU node the
host path shares the CPU with the engine's own processes. Peak RSS is the child's
own (wait4), so the two sizes can be compared: memory must not follow dataset size.
"""

from __future__ import annotations

from typing import Any

import hotspots
from context import Context
from harness import job_dict, manifest, run_cli, write_job
from summary import Goal, row
from workloads import replay_rows

GOAL_ROWS_PER_S = 5000
GOAL_RSS_GROWTH = 1.3


def _job(ctx: Context, inputs: Any, out: Any) -> dict[str, Any]:
    engine = {"kind": "replay", "tokenizer": ctx.tokenizer_dir,
              "trust_remote_code": ctx.engine.get("trust_remote_code", False)}
    # The job defaults a user gets (1000 rows per shard, a part per 1000 rows).
    return job_dict(ctx, inputs, out, engine=engine, sampling={}, rows_per_shard=1000,
                    flush_rows=1000)


def _measure(ctx: Context, n: int, window_s: float | None, **kw: Any) -> dict[str, Any]:
    """One run, cut `window_s` after its first commit so a slow pipeline cannot blow
    the time budget (its pace then comes from its commits, its RSS from its life so far)."""
    d = ctx.work / f"host_path_{n}"
    inputs = replay_rows(ctx.work / f"replay_{n}.parquet", n)
    job = write_job(d / "job.json", _job(ctx, inputs, d / "out"))
    res = run_cli(ctx, job, pin_core=0, window_s=window_s, **kw)
    done = res.commits[-1][1] if res.commits else 0
    out = {"rows": n, "rows_committed": done, "completed": not res.capped,
           "steady_rows_per_s": res.steady_rows_per_s(), "wall_s": res.wall_s,
           "peak_rss_mib": res.peak_rss_mib, "window_s": window_s}
    if not res.capped:
        this = manifest(d / "out")["this_run"]
        out.update(generation_s=this["generation_s"], rows_per_s=this["rows_per_s"],
                   tokenizer_load_s=this.get("engine_load_s"))
    return out


def run(ctx: Context) -> dict[str, Any]:
    small, large = ctx.size(100_000, 10_000), ctx.size(1_000_000, 50_000)
    # At the goal's pace (5,000 rows/s) both sizes finish inside their windows.
    windows = {small: ctx.size(30, 20), large: ctx.size(180, 40)}
    runs = {n: _measure(ctx, n, windows[n]) for n in (small, large)}
    prof_rows = ctx.size(6_000, 3_000)
    raw = ctx.work / "host_path.pyspy.txt"
    _measure(ctx, prof_rows, None, wrap=hotspots.wrap(raw))  # py-spy writes on a clean exit
    spots = hotspots.hot_spots(raw)
    a, b = runs[small], runs[large]
    growth = b["peak_rss_mib"] / a["peak_rss_mib"]
    summary = [
        *(row(f"rows/s at {n:,} rows (1 core)", _pace_text(r, _pace(r)),
              Goal(f">= {GOAL_ROWS_PER_S:,}", _pace(r) >= GOAL_ROWS_PER_S))
          for n, r in runs.items()),
        row(f"peak RSS at {small:,} / {large:,} rows",
            f"{a['peak_rss_mib']:,.0f} / {b['peak_rss_mib']:,.0f} MiB"
            + ("" if b["completed"] else f" (large cut at {b['rows_committed']:,} rows)")),
        row("peak RSS growth", f"{growth:.2f}x",
            Goal(f"<= {GOAL_RSS_GROWTH}x", growth <= GOAL_RSS_GROWTH)),
        row("wall incl. start-up, small / large", f"{a['wall_s']:.1f} s / {b['wall_s']:.1f} s"),
    ]
    summary += [row(f"hot spot {i + 1}", f"{s['share']:.0%}: `{s['where']}`")
                for i, s in enumerate(spots["top"])]
    return {"settings": {"sizes": [small, large], "pinned_core": 0, "rows_per_shard": 1000,
                         "flush_rows": 1000, "profiled_rows": prof_rows,
                         "reasoning_bytes": "1024-2048", "tool_call_share": 0.25},
            "figures": {"runs": {str(k): v for k, v in runs.items()}, "rss_growth": growth,
                        "hot_spots": spots,
                        # the seed's figures: a replay run has no tokens or TTFT
                        "requests_per_s": _pace(b), "output_tokens_per_s": None,
                        "ttft_mean_s": None, "ttft_median_s": None},
            "summary": summary,
            "notes": ["rows/s: the manifest's rows_generated / generation_s for a run that "
                      "finished, else rows committed per second between the first and last "
                      "commit of a run cut at the end of its window",
                      "hot spots: share of the py-spy samples of the pipeline threads, charged "
                      "to the deepest thinkbatch frame -> the call it was making"]}


def _pace(r: dict[str, Any]) -> float:
    return r.get("rows_per_s") or r["steady_rows_per_s"] or 0.0


def _pace_text(r: dict[str, Any], pace: float) -> str:
    if r["completed"]:
        return f"{pace:,.0f}"
    if r["rows_committed"] >= r["rows"]:
        return f"{pace:,.0f} (every row committed; cut while finishing)"
    return (f"{pace:,.0f} (cut {r['window_s']:.0f} s after the 1st commit, at "
            f"{r['rows_committed']:,} rows; "
            f"all {r['rows']:,} would take ~{r['rows'] / max(pace, 1e-9) / 60:.0f} min)")
