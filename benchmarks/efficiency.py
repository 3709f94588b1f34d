"""Benchmark 1: how close `thinkbatch run` comes to one bare `LLM.chat` call.

Same prompts, same engine arguments, same SamplingParams (greedy, fixed output length
through ignore_eos + max_tokens). Throughput excludes engine loading on both sides;
end-to-end wall time includes it.
"""

from __future__ import annotations

from typing import Any

from context import Context
from harness import job_dict, run_bare, run_cli, thinkbatch_figures, write_job
from summary import Goal, row
from workloads import prompts

GOAL_RATIO = 0.95
TTFT_NOTE = ("TTFT counts from a request's arrival in the engine: one LLM.chat enqueues every "
             "row at once, thinkbatch keeps engine.max_in_flight rows queued, so their TTFTs "
             "measure different queues and are not a like-for-like comparison")


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(512, 128)
    max_tokens = ctx.size(128, 32) if ctx.mini else 256
    d = ctx.work / "efficiency"
    inputs = prompts(d / "prompts.parquet", n)
    sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=128, flush_rows=64))
    bare = run_bare(ctx, job, d / "bare.json", ["one_call", "step"])
    tb_run = run_cli(ctx, job)
    tb = thinkbatch_figures(d / "out", tb_run)
    ideal = {**bare["one_call"], "engine_load_s": bare["engine_load_s"], "wall_s": bare["wall_s"]}
    ratio = tb["output_tokens_per_s"] / ideal["output_tokens_per_s"]
    step = bare["step"]
    return {
        "settings": {"rows": n, "max_tokens": max_tokens, "sampling": sampling,
                     "rows_per_shard": 128, "flush_rows": 64,
                     "max_in_flight": ctx.engine.get("max_in_flight", 512)},
        "figures": {"bare_one_chat_call": ideal, "thinkbatch": tb, "ratio_b_over_a": ratio,
                    "decode_step": step},
        "summary": [
            row("decode step at batch %d" % step["batch"], f"{step['step_ms']:.1f} ms"),
            row("(a) bare LLM.chat, output tok/s", f"{ideal['output_tokens_per_s']:,.0f}"),
            row("(b) thinkbatch run, output tok/s", f"{tb['output_tokens_per_s']:,.0f}"),
            row("ratio b/a (load excluded)", f"{ratio:.3f}", Goal(">= 0.95", ratio >= GOAL_RATIO)),
            row("wall incl. load: (a) / (b)", f"{ideal['wall_s']:.1f} s / {tb['wall_s']:.1f} s"),
            row("engine load: (a) / (b)",
                f"{ideal['engine_load_s']:.1f} s / {tb['engine_load_s']:.1f} s"),
            row("requests/s (a) / (b)",
                f"{ideal['requests_per_s']:.2f} / {tb['requests_per_s']:.2f}"),
            row("TTFT mean / median (a)", _ttft(ideal)),
            row("TTFT mean / median (b)", _ttft(tb)),
        ],
        "notes": [TTFT_NOTE],
    }


def _ttft(f: dict[str, Any]) -> str:
    if f.get("ttft_mean_s") is None:
        return "n/a"
    return f"{f['ttft_mean_s']:.2f} s / {f['ttft_median_s']:.2f} s"
