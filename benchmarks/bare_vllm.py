"""Bare vLLM over a thinkbatch job's prompts: the ideal the pipeline is measured against.

    python benchmarks/bare_vllm.py JOB.json OUT.json MODE [MODE ...]

MODE is `one_call` (one `LLM.chat` over every prompt: the throughput ideal),
`chunks:N` (a naive loop of `LLM.chat` over N rows at a time) or `step` (median
decode-step time at the scheduler's batch size). Engine arguments and SamplingParams
come from the job through thinkbatch's own builders (`machine_kwargs`, `SamplingBuilder`),
so both sides run the same settings; only the engine's work is timed, never its loading. A `sampling` column
of JSON (`{"max_tokens": N}`) in the input gives per-row overrides.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

os.environ["VLLM_CONFIGURE_LOGGING"] = "0"


def _requests(job: Any) -> tuple[list[list[dict[str, str]]], list[Any]]:
    import pyarrow.dataset as ds

    from thinkbatch.schemas.job import SamplingSpec
    from thinkbatch.tasks.rows.sampling import SamplingBuilder

    table = ds.dataset(job.input.path, format="parquet").to_table()
    builder = SamplingBuilder(job)
    defaults = job.sampling.model_dump(by_alias=True)
    prompts = table.column(job.input.prompt_column).to_pylist()
    overrides = (table.column("sampling").to_pylist() if "sampling" in table.column_names
                 else [None] * len(prompts))
    system = ([{"role": "system", "content": job.input.system_prompt}]
              if job.input.system_prompt else [])
    messages, params = [], []
    for i, (prompt, over) in enumerate(zip(prompts, overrides)):
        messages.append([*system, {"role": "user", "content": prompt}])
        spec = SamplingSpec.model_validate({**defaults, **json.loads(over)}) if over else None
        params.append(builder.for_sample(spec, i, 0))
    return messages, params


def _figures(outs: list[Any], seconds: float) -> dict[str, Any]:
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
    return {
        "requests": len(outs), "output_tokens": tokens, "generation_s": seconds,
        "requests_per_s": len(outs) / seconds, "output_tokens_per_s": tokens / seconds,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
    }


def _chat(llm: Any, messages: list, params: list, ctk: dict[str, Any]) -> list[Any]:
    return llm.chat(messages, params, use_tqdm=False, chat_template_kwargs=ctk or None)


def _step_ms(llm: Any, messages: list, params: list, steps: int = 24) -> dict[str, Any]:
    """Median time of one decode step with the scheduler's batch full."""
    batch = min(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs, len(messages))
    p = params[0].clone()
    p.max_tokens, p.ignore_eos = steps + 4, True
    llm.enqueue_chat(messages[:batch], [p] * batch, use_tqdm=False)
    times = []
    while llm.llm_engine.has_unfinished_requests():
        t = time.perf_counter()
        llm.llm_engine.step()
        times.append(time.perf_counter() - t)
    decode = times[2:steps + 2]  # the first steps prefill
    return {"batch": batch, "step_ms": 1000 * statistics.median(decode), "steps": len(decode)}


def main(job_path: str, out_path: str, modes: list[str]) -> None:
    from vllm import LLM

    from thinkbatch.schemas.job import JobSpec
    from thinkbatch.tasks.rows.engine import machine_kwargs
    from thinkbatch.tasks.rows.engine_settings import may_seed

    job = JobSpec.model_validate(json.loads(open(job_path).read()))
    messages, params = _requests(job)
    started = time.perf_counter()
    llm = LLM(**machine_kwargs(job.engine, job.parsers, may_seed(job))[0])
    result: dict[str, Any] = {"engine_load_s": time.perf_counter() - started}
    ctk = dict(job.chat_template_kwargs)
    for mode in modes:
        if mode == "step":
            result["step"] = _step_ms(llm, messages, params)
            continue
        chunk = int(mode.split(":")[1]) if mode.startswith("chunks:") else len(messages)
        t = time.perf_counter()
        outs = [o for i in range(0, len(messages), chunk)
                for o in _chat(llm, messages[i:i + chunk], params[i:i + chunk], ctk)]
        result[mode] = _figures(outs, time.perf_counter() - t)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
