"""Benchmark 5: start-up overhead: command start to the first request entering the
engine, engine load excluded (imports, Prefect, job checks, planning, storage).

Measured on the real CLI, by the first `submitted` event of its trace
(tasks/report/trace.py), minus the manifest's `engine_load_s`: with the replay engine (no
model: pure pipeline overhead) and with vLLM (the same, plus what vLLM imports).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from context import HERE, Context
from harness import job_dict, manifest, run_cli, write_job
from summary import row
from workloads import prompts, replay_rows


def _import_s(ctx: Context, module: str) -> float:
    """Seconds to import `module` in a fresh interpreter, the interpreter's own start left out."""
    def wall(code: str) -> float:
        t = time.monotonic()
        subprocess.run([ctx.python, "-c", code], check=True, cwd=HERE.parent)
        return time.monotonic() - t
    return min(wall(f"import {module}") for _ in range(2)) - min(wall("pass") for _ in range(2))


def _first_submit(ctx: Context, name: str, job: dict[str, Any]) -> dict[str, Any]:
    path = write_job(ctx.work / "startup" / f"{name}.json", job)
    res = run_cli(ctx, path)
    load = manifest(ctx.work / "startup" / f"{name}-out")["this_run"].get("engine_load_s", 0.0)
    first = res.first_submit_s if res.first_submit_s is not None else float("nan")
    return {"first_submit_s": first, "engine_load_s": load, "overhead_s": first - load,
            "wall_s": res.wall_s}


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.work / "startup"
    replay_in = replay_rows(d / "replay.parquet", 2000)
    engine_in = prompts(d / "prompts.parquet", 64)
    replay_engine = {"kind": "replay", "tokenizer": ctx.tokenizer_dir,
                     "trust_remote_code": ctx.engine.get("trust_remote_code", False)}
    replay = _first_submit(ctx, "replay", job_dict(
        ctx, replay_in, d / "replay-out", engine=replay_engine, sampling={},
        rows_per_shard=1000, flush_rows=1000))
    vllm = _first_submit(ctx, "vllm", job_dict(
        ctx, engine_in, d / "vllm-out", rows_per_shard=64, flush_rows=64,
        sampling={"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}))
    imports = {m: _import_s(ctx, m) for m in ("thinkbatch.flows.job", "vllm")}
    return {"settings": {"replay_rows": 2000, "vllm_rows": 64},
            "figures": {"replay": replay, "vllm": vllm, "import_s": imports},
            "summary": [
                row("start -> first submit, replay engine, load excluded",
                    f"{replay['overhead_s']:.2f} s "
                    f"(tokenizer load {replay['engine_load_s']:.2f} s)"),
                row("start -> first submit, vLLM engine, load excluded",
                    f"{vllm['overhead_s']:.2f} s (engine load {vllm['engine_load_s']:.1f} s)"),
                row("of which: importing thinkbatch's flow (Prefect, pyarrow, pydantic)",
                    f"{imports['thinkbatch.flows.job']:.2f} s"),
                row("of which: importing vllm (the job checks need it, even for replay)",
                    f"{imports['vllm']:.2f} s"),
            ]}
