"""Benchmark 2: heavy-tailed output lengths, where batch barriers hurt most.

95% of rows get a short max_tokens, 5% one 16x longer (ignore_eos, so lengths are
exact). (a) one bare LLM.chat over all rows, (b) a naive loop of LLM.chat over 64-row
chunks (each chunk waits for its longest row), (c) thinkbatch with per-row
`max_tokens` from a `sampling` JSON column (`input.sampling_column`).
"""

from __future__ import annotations

from typing import Any

from context import Context
from harness import job_dict, run_bare, run_cli, thinkbatch_figures, write_job
from summary import Goal, row
from workloads import prompts

CHUNK = 64
LONG_EVERY = 20  # 5% of rows
FACTOR = 16


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(1024, 320) if ctx.mini else ctx.size(512, 256)
    short = ctx.size(16, 8) if ctx.mini else 64
    long = short * FACTOR
    lengths = [long if i % LONG_EVERY == LONG_EVERY - 1 else short for i in range(n)]
    d = ctx.work / "heavy_tail"
    inputs = prompts(d / "prompts.parquet", n, max_tokens=lengths)
    sampling = {"temperature": 0.0, "max_tokens": long, "ignore_eos": True}
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=256, flush_rows=128,
                                             input_extra={"sampling_column": "sampling"}))
    bare = run_bare(ctx, job, d / "bare.json", ["one_call", f"chunks:{CHUNK}"])
    a, b = bare["one_call"], bare[f"chunks:{CHUNK}"]
    figures: dict[str, Any] = {
        "bare_one_chat_call": a, f"bare_chunks_of_{CHUNK}": b,
        "chunks_over_one_call": b["output_tokens_per_s"] / a["output_tokens_per_s"]}
    summary = [
        row("(a) one LLM.chat, output tok/s", f"{a['output_tokens_per_s']:,.0f}"),
        row(f"(b) LLM.chat per {CHUNK} rows, output tok/s",
            f"{b['output_tokens_per_s']:,.0f} ({figures['chunks_over_one_call']:.2f} of a)"),
    ]
    tb = thinkbatch_figures(d / "out", run_cli(ctx, job))
    c_a = tb["output_tokens_per_s"] / a["output_tokens_per_s"]
    c_b = tb["output_tokens_per_s"] / b["output_tokens_per_s"]
    figures.update(thinkbatch=tb, thinkbatch_over_one_call=c_a, thinkbatch_over_chunks=c_b)
    summary += [
        row("(c) thinkbatch, output tok/s", f"{tb['output_tokens_per_s']:,.0f}"),
        row("c/a", f"{c_a:.3f}", Goal(">= 0.9", c_a >= 0.9)),
        row("c/b", f"{c_b:.2f}", Goal("clearly > 1 (>= 1.2)", c_b >= 1.2)),
        row("TTFT mean / median (c)",
            f"{tb['ttft_mean_s']:.2f} s / {tb['ttft_median_s']:.2f} s"
            if tb["ttft_mean_s"] is not None else "n/a"),
    ]
    return {"settings": {"rows": n, "short_max_tokens": short, "long_max_tokens": long,
                         "long_share": 1 / LONG_EVERY, "chunk": CHUNK, "sampling": sampling,
                         "max_in_flight": ctx.engine.get("max_in_flight", 512)},
            "figures": figures, "summary": summary}
