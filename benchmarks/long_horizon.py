"""Benchmark: long-horizon rollouts (50-300 tool calls a conversation) through the real
pipeline, with generation made free so the host path is what is measured.

`thinkbatch run` of a rollout job whose engine is long_horizon_engine.py's scripted one:
the product's render (`Histories.next`, the miniature's template and tokenizer, on the
render thread) and a fixed engine step; every other part (feeder, driver, parsers, tools,
committer, checkpoints of open conversations) is the product's. Conversations run from
`LOW` to `HIGH` turns, each turn one get_weather call that sleeps a log-normal time and
returns ~1.2 kB, the window 262,144 tokens (the longest ends near 190k).

- per turn number: the render thread's CPU per turn, the driver thread's CPU per turn
  (between engine polls, charged to the turns of the batch it handled) and its share of
  the two; the goal is flat.
- memory: RSS against the text of the open conversations, sampled through the run; the
  slope of a least-squares line is what one more byte of open conversation costs.
- a kill: the same job SIGKILLed at a random time (seeded), then rerun to the end; the
  tally files count turns finished before the kill and generated again, and tool calls run
  in both runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from context import HERE, Context
from harness import manifest, run_cli, write_job
from long_horizon_engine import targets
from summary import Goal, row

LOW, HIGH = 50, 300
MEDIAN_S, SIGMA, CAP_S = 0.02, 1.2, 1.0
RESULT_CHARS = 1200
STEP_S = 0.005
MAX_MODEL_LEN = 262_144
CHECKPOINT_S = 0  # open conversations saved at every turn boundary
BUCKETS = [(1, 10), (41, 50), (91, 100), (141, 150), (191, 200), (241, 250), (291, 300)]
TOOLS = f'''"""The long_horizon benchmark's tool (written by benchmarks/long_horizon.py):
get_weather sleeps a log-normal time drawn from a hash of its arguments and returns about
{RESULT_CHARS} characters; each call is appended to the file LONG_HORIZON_TALLY names."""

import hashlib
import math
import os
import statistics
import time

MEDIAN_S, SIGMA, CAP_S = {MEDIAN_S}, {SIGMA}, {CAP_S}
BODY = "Mostly sunny with light winds from the west, clouds later in the day. " * 20


def _latency(city: str) -> float:
    u = (int(hashlib.sha256(city.encode()).hexdigest()[:13], 16) + 0.5) / 16 ** 13
    return min(CAP_S, MEDIAN_S * math.exp(SIGMA * statistics.NormalDist().inv_cdf(u)))


def get_weather(city: str) -> str:
    """Current weather in a city."""
    time.sleep(_latency(city))
    with open(os.environ["LONG_HORIZON_TALLY"], "a") as f:
        f.write(city + "\\n")
    return (city + ": " + BODY)[:{RESULT_CHARS}]
'''


def _job(ctx: Context, d: Path, n: int) -> Path:
    tools = d / "bench_tools.py"
    tools.write_text(TOOLS)
    inputs = d / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [
        f"conversation {i}: check the weather every turn until told to stop."
        for i in range(n)]}), inputs)
    model = HERE.parent / "assets" / "tiny-kimi-thinking"
    return write_job(d / "job.json", {
        "name": "bench-long-horizon",
        "input": {"path": str(inputs), "id_column": "id", "prompt_column": "prompt"},
        "shards": {"rows_per_shard": n},
        "engine": {"kind": "vllm", "model": str(model), "max_model_len": MAX_MODEL_LEN},
        "sampling": {"max_tokens": 64},
        "parsers": {"reasoning": "kimi_k2", "tool_call": "kimi_k2"},
        "output": {"path": str(d / "out"), "flush_rows": n, "flush_seconds": 60},
        "rollout": {"tools": [{"python": str(tools)}], "max_turns": HIGH,
                    "max_concurrent_tools": 64, "checkpoint_seconds": CHECKPOINT_S},
    })


def _run(ctx: Context, d: Path, n: int, tag: str, **kw: Any) -> tuple[Any, dict[str, Any]]:
    config = d / f"{tag}.config.json"
    stats = d / f"{tag}.stats.json"
    config.write_text(json.dumps({
        "max_model_len": MAX_MODEL_LEN, "targets": targets(n, LOW, HIGH), "step_s": STEP_S,
        "stats": str(stats), "tally": str(d / f"{tag}.engine_tally"), **kw}))
    os.environ["LONG_HORIZON_CONFIG"] = str(config)
    os.environ["LONG_HORIZON_TALLY"] = str(d / f"{tag}.tool_tally")
    try:
        res = run_cli(ctx, d / "job.json",
                      wrap=[ctx.python, str(HERE / "long_horizon_engine.py")], timeout_s=600)
    except RuntimeError as e:  # the engine's own SIGKILL, when the config asks for one
        if "kill_after_done" not in kw or "exited -9" not in str(e):
            raise
        return -9, {}
    return res, json.loads(stats.read_text()) if stats.exists() else {}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _per_turn(stats: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in BUCKETS:
        def pick(key: str) -> list[float]:
            return [x for t in range(lo, hi + 1) for x in stats[key].get(str(t), ())]
        render, driver, tokens = pick("render_cpu"), pick("driver_cpu"), pick("prompt_tokens")
        if not render or not driver:
            continue
        r, dr = statistics.mean(render), statistics.mean(driver)
        out.append({"turns": f"{lo}-{hi}", "conversation_turns": len(render),
                    "render_ms": 1e3 * r, "driver_ms": 1e3 * dr,
                    "driver_share": dr / (r + dr),
                    "prompt_tokens_mean": statistics.mean(tokens) if tokens else None})
    return out


def _memory(samples: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Memory (RSS or traced) against the open conversations' text, from (memory, text,
    open conversations) samples."""
    xs, ys = [s[1] for s in samples], [s[0] for s in samples]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
             / sum((x - mx) ** 2 for x in xs))
    peak = max(samples, key=lambda s: s[1])
    base = ys[0]
    return {"samples": len(samples), "per_text_byte": slope,
            "peak_open_text_mib": peak[1] / 2**20, "open_at_peak_text": peak[2],
            "first_mib": base / 2**20, "at_peak_text_mib": peak[0] / 2**20,
            "growth_per_text_byte_at_peak": (peak[0] - base) / max(peak[1], 1),
            "text_per_open_conversation_at_peak_kib": peak[1] / max(peak[2], 1) / 1024}


def _where(where: str, scratch: Path) -> str:
    """A traceback line's file, named from the repository, the scratch folder, the
    standard library or site-packages: no machine's own paths in the results."""
    where = where.split("site-packages/")[-1]
    for root in (f"{HERE.parent}/", f"{scratch}/", f"{sysconfig.get_paths()['stdlib']}/"):
        where = where.removeprefix(root)
    return where


def _kill(ctx: Context, d: Path, n: int, seed: int = 23) -> dict[str, Any]:
    """A kill after a random share (30-80%) of the job's turns, with tracemalloc on (the
    memory figures come from this run), then a rerun cut once it finished 3 turns a
    conversation: enough to see where each open one resumed and which tools ran again."""
    total = sum(targets(n, LOW, HIGH))
    kill_at = int(total * random.Random(seed).uniform(0.3, 0.8))
    first, _ = _run(ctx, d, n, "killed", kill_after_done=kill_at, tracemalloc=True)
    second, _ = _run(ctx, d, n, "rerun", kill_after_done=3 * n)
    done = {tuple(line.split()[1:]) for line in _lines(d / "killed.engine_tally")
            if line.startswith("done")}
    again = [tuple(line.split()[1:]) for line in _lines(d / "rerun.engine_tally")
             if line.startswith("submit")]
    # open: started and not committed (an answered row not yet in a part is open too:
    # the rerun takes it up again)
    answered = {str(c) for c, t in enumerate(targets(n, LOW, HIGH)) if (str(c), str(t)) in done}
    open_at_kill = ({c for c, _ in done} - answered) | {c for c, _ in again}
    regenerated = [k for k in again if k in done]
    calls_a = Counter(_lines(d / "killed.tool_tally"))
    calls_b = Counter(_lines(d / "rerun.tool_tally"))
    memory = [tuple(map(float, line.split()[2:])) for line in _lines(d / "killed.engine_tally")
              if line.startswith("memory")]
    held = [line.split(" ", 2)[1:] for line in _lines(d / "killed.engine_tally")
            if line.startswith("holder")]
    holders = [{"mib": int(size) / 2**20, "where": _where(where, d)} for size, where in held]
    return {"kill_after_turns": kill_at, "of_turns": total,
            "memory": {**_memory(memory), "holders_at_kill": holders},
            "turns_before_kill": len(done), "open_at_kill": len(open_at_kill),
            "turns_regenerated": len(regenerated),
            "regenerated_per_open_conversation": len(regenerated) / max(len(open_at_kill), 1),
            "tools_run_before_kill": sum(calls_a.values()),
            "tools_rerun": sum((calls_a & calls_b).values()),
            "killed_by_engine": [first == -9, second == -9]}


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(8, 4)
    d = ctx.work / "long_horizon"
    d.mkdir(parents=True, exist_ok=True)
    _job(ctx, d, n)
    full, stats = _run(ctx, d, n, "full")
    if full.returncode != 0:
        raise RuntimeError(f"the long-horizon run exited {full.returncode}:\n{full.stderr_tail}")
    m = manifest(d / "out")
    per_turn = _per_turn(stats)
    rss = _memory([(m, text, k) for _, m, text, k in stats["rss"]])
    shutil.rmtree(d / "out")
    kill = _kill(ctx, d, n)
    mem = kill.pop("memory")
    load = os.getloadavg()
    first, last = per_turn[0], per_turn[-1]
    host_first = first["render_ms"] + first["driver_ms"]
    host_last = last["render_ms"] + last["driver_ms"]
    growth = host_last / host_first
    summary = [
        *(row(f"turns {p['turns']} (~{p['prompt_tokens_mean'] or 0:,.0f} prompt tokens): "
              "render thread / driver thread CPU per turn, driver share",
              f"{p['render_ms']:.1f} / {p['driver_ms']:.1f} ms, {p['driver_share']:.0%}")
          for p in per_turn),
        row(f"host CPU per turn, turns {last['turns']} vs {first['turns']}",
            f"{host_last:.1f} vs {host_first:.1f} ms ({growth:.1f}x)",
            Goal("flat", growth <= 1.5)),
        row(f"driver thread CPU per turn, turns {last['turns']} vs {first['turns']}",
            f"{last['driver_ms']:.1f} vs {first['driver_ms']:.1f} ms",
            Goal("flat", last["driver_ms"] <= 1.5 * first["driver_ms"])),
        row("Python memory per byte of open conversation text (tracemalloc, killed run: "
            "least-squares slope)", f"{mem['per_text_byte']:.1f}x",
            Goal("<= 3x", mem["per_text_byte"] <= 3)),
        row("at the most open text: text, traced growth since the first sample",
            f"{mem['peak_open_text_mib']:.2f} MiB in {mem['open_at_peak_text']} "
            f"conversations, {mem['growth_per_text_byte_at_peak']:.1f}x"),
        row("RSS per byte of open conversation text (timed run: slope, allocator pages "
            "included)", f"{rss['per_text_byte']:.1f}x"),
        row("kill: turns finished before it, open conversations then",
            f"{kill['turns_before_kill']}, {kill['open_at_kill']} (SIGKILL after "
            f"{kill['kill_after_turns']} of {kill['of_turns']} turns)"),
        row("kill: turns regenerated per open conversation",
            f"{kill['regenerated_per_open_conversation']:.2f} ({kill['turns_regenerated']})",
            Goal("<= 1", kill["regenerated_per_open_conversation"] <= 1)),
        row("kill: tool calls run again", f"{kill['tools_rerun']} of "
            f"{kill['tools_run_before_kill']}", Goal("0", kill["tools_rerun"] == 0)),
        row("conversations, turns, tool calls; wall incl. start-up",
            f"{n}, {m.get('turns')}, {m.get('tool_calls_total')}; {full.wall_s:.0f} s"),
        row("load average (1, 5, 15 min) at the end", ", ".join(f"{x:.1f}" for x in load)),
    ]
    return {"settings": {"conversations": n, "turns": [LOW, HIGH], "step_s": STEP_S,
                         "max_model_len": MAX_MODEL_LEN, "tool_result_chars": RESULT_CHARS,
                         "tool_latency": {"distribution": "log-normal", "median_s": MEDIAN_S,
                                          "sigma": SIGMA, "cap_s": CAP_S},
                         "checkpoint_seconds": CHECKPOINT_S},
            "figures": {"per_turn": per_turn, "memory": mem, "rss": rss, "kill": kill,
                        "turns": m.get("turns"), "tool_calls_total": m.get("tool_calls_total"),
                        "wall_s": full.wall_s, "peak_rss_mib": full.peak_rss_mib,
                        "load_avg_end": load,
                        "requests_per_s": None, "output_tokens_per_s": None,
                        "ttft_mean_s": None, "ttft_median_s": None},
            "summary": summary,
            "notes": [
                "generation is a scripted engine (a 5 ms step, no model); the render is the "
                "product's, on the miniature's Hugging Face tokenizer and Kimi template",
                "driver CPU per turn: the driver thread's CPU time between two engine polls, "
                "split evenly over the turns the first poll returned (parse, tool dispatch, "
                "next prompt's request, commits and checkpoints all count)",
                "memory: what Python holds (tracemalloc, started with the engine, in the "
                "killed run) and, in the timed run, process RSS, sampled every 0.25 s "
                "against the summed text (contents, reasoning, call arguments) of the "
                "conversations then open; the slope of a least-squares line is the cost "
                "of one more byte of open conversation; RSS also holds allocator pages "
                "freed but kept, so it is an upper bound",
                "open conversations are saved at every turn boundary "
                "(rollout.checkpoint_seconds 0), in every run, so the timed run pays for it",
                "kill: the engine SIGKILLs the run's process group after a seeded random "
                "30-80% of the job's turns; the rerun is cut once it finished 3 turns a "
                "conversation; turns regenerated: turns the rerun submitted that the "
                "killed run had finished; tools run again: calls (unique arguments per "
                "conversation and turn) in both runs' tally"]}
