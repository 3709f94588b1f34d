"""The turn-synchronous rollout loop a user would write around one vLLM `LLM`, over a
thinkbatch rollout job's rows: what thinkbatch's rollouts are measured against.

    python benchmarks/sync_rollouts.py JOB.json OUT.json

Turn k: one `LLM.chat` over every open conversation (the job's tools and
chat_template_kwargs, its SamplingParams with the regex), each output parsed with vLLM's
kimi_k2 parsers (thinkbatch's OutputParser), each turn seeded as thinkbatch seeds it
(`turn_seed`: a stream of its own per turn), then every tool call of the turn on a thread
pool of `rollout.max_concurrent_tools` threads, waiting for all of them, then turn k+1.
Messages are built and rendered as thinkbatch's are (`assistant_message`, `as_served`),
so both sides feed the engine the same prompts. Only the turns are timed, never the
engine's loading.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ["VLLM_CONFIGURE_LOGGING"] = "0"


def _functions(job: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The functions of the job's one Python tool file, by tool name, called directly."""
    (source,) = job.rollout.tools
    spec = importlib.util.spec_from_file_location("sync_rollout_tools", source.python)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {t["function"]["name"]: getattr(module, t["function"]["name"]) for t in tools}


def _call(functions: dict[str, Any], call: dict[str, Any]) -> tuple[str, float]:
    """A tool's result text (or its error text, as the model would read it) and latency."""
    started = time.perf_counter()
    try:
        content = str(functions[call["name"]](**json.loads(call["arguments"] or "{}")))
    except Exception as e:
        content = f"error: tool {call['name']!r} failed: {type(e).__name__}: {e}"
    return content, time.perf_counter() - started


def main(job_path: str, out_path: str) -> None:
    import pyarrow.dataset as ds
    from vllm import LLM

    from thinkbatch.schemas.job import JobSpec
    from thinkbatch.schemas.output import Status
    from thinkbatch.schemas.record import Generation, ToolResult
    from thinkbatch.tasks.rows.conversation import assistant_message, tool_message
    from thinkbatch.tasks.rows.engine import as_served, machine_kwargs
    from thinkbatch.tasks.rows.engine_settings import may_seed
    from thinkbatch.tasks.rows.parse import OutputParser
    from thinkbatch.tasks.rows.sampling import SamplingBuilder
    from thinkbatch.tasks.tools.toolbox import Toolbox

    job = JobSpec.model_validate(json.loads(Path(job_path).read_text()))
    spec = job.rollout
    with Toolbox.open(spec, Path.cwd()) as box:  # the same tool schemas thinkbatch offers
        tools = box.schemas()
    functions = _functions(job, tools)
    prompts = ds.dataset(job.input.path, format="parquet").to_table(
        columns=[job.input.prompt_column]).column(0).to_pylist()
    system = ([{"role": "system", "content": job.input.system_prompt}]
              if job.input.system_prompt else [])
    conversations = [[*system, {"role": "user", "content": p}] for p in prompts]
    builder = SamplingBuilder(job)
    ctk = dict(job.chat_template_kwargs) or None

    started = time.perf_counter()
    llm = LLM(**machine_kwargs(job.engine, job.parsers, may_seed(job))[0])
    result: dict[str, Any] = {"engine_load_s": time.perf_counter() - started}
    parser = OutputParser(job.parsers, llm.get_tokenizer(), job.engine.model)
    pool = ThreadPoolExecutor(spec.max_concurrent_tools)

    open_ = list(range(len(conversations)))
    status: Counter[str] = Counter()
    tokens = turns = 0
    chat_s = tools_s = 0.0
    latencies: list[float] = []
    ran: list[tuple[str, str]] = []  # (name, arguments) of every call run
    per_turn = []
    t_start = time.perf_counter()
    for turn in range(1, spec.max_turns + 1):
        t0 = time.perf_counter()
        outs = llm.chat([as_served(conversations[i]) for i in open_],
                        [builder.for_sample(None, i, 0, turn - 1) for i in open_],
                        use_tqdm=False, tools=tools, chat_template_kwargs=ctk)
        t1 = time.perf_counter()
        pending = []  # (conversation, its calls, their futures)
        for i, out in zip(open_, outs):
            comp = out.outputs[0]
            gen = Generation(key=str(i), text=comp.text, token_ids=comp.token_ids,
                             finish_reason=comp.finish_reason,
                             prompt_token_ids=out.prompt_token_ids, ttft_s=None, latency_s=None)
            tokens += len(comp.token_ids)
            turns += 1
            parsed = parser.parse(gen, tools, ctk or {})
            if parsed.status is not Status.OK:
                status[parsed.status.value] += 1
                continue
            conversations[i].append(assistant_message(parsed))
            if not parsed.tool_calls:
                status["ok"] += 1
            elif turn == spec.max_turns:
                status["max_turns"] += 1
            else:
                pending.append((i, parsed.tool_calls,
                                [pool.submit(_call, functions, c) for c in parsed.tool_calls]))
        t2 = time.perf_counter()
        for i, calls, futures in pending:  # wait for every tool of the turn
            for call, fut in zip(calls, futures):
                content, latency = fut.result()
                latencies.append(latency)
                ran.append((call["name"], call["arguments"]))
                conversations[i].append(tool_message(
                    ToolResult(call["id"], call["name"], content, None, latency)))
        t3 = time.perf_counter()
        chat_s += t1 - t0
        tools_s += t3 - t2
        per_turn.append({"turn": turn, "conversations": len(open_), "chat_s": t1 - t0,
                         "parse_s": t2 - t1, "tools_wait_s": t3 - t2})
        open_ = [i for i, _, _ in pending]
        if not open_:
            break
    wall = time.perf_counter() - t_start
    pool.shutdown()
    n = len(conversations)
    result.update({
        "conversations": n, "turns": turns, "tool_calls_total": len(ran),
        "output_tokens": tokens, "generation_s": wall,
        "conversations_per_s": n / wall, "output_tokens_per_s": tokens / wall,
        "chat_s": chat_s, "tools_wait_s": tools_s,
        "engine_idle_share": (wall - chat_s) / wall, "tools_wait_share": tools_s / wall,
        "status_counts": dict(status), "tool_latencies_s": latencies, "calls": ran,
        "per_turn": per_turn,
    })
    Path(out_path).write_text(json.dumps(result, indent=1))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
