"""Run thinkbatch's benchmarks; write results/<name>.json and results/README.md.

    python benchmarks/run.py [--only NAME] [--quick] [--model DIR] [--engine-arg k=v ...]

Without --model, a miniature Kimi-K2 is written to benchmarks/.cache and run on
vLLM's CPU build; with it (e.g. moonshotai/Kimi-K2-Thinking and
--engine-arg tensor_parallel_size=8 ...) the same benchmarks run on a GPU node.
On the CPU build, tcmalloc and Intel OpenMP are preloaded (the script re-executes
itself with LD_PRELOAD) when they are installed; each result records whether.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import machine
from context import Context

BENCHMARKS = {  # name: (module, title)
    "efficiency": ("efficiency", "pipeline vs one bare LLM.chat call"),
    "heavy_tail": ("heavy_tail", "heavy-tailed output lengths"),
    "host_path": ("host_path", "host path without a model (replay engine)"),
    "resume_cost": ("resume_cost", "rows regenerated after a kill"),
    "startup": ("startup", "start-up overhead to the first request"),
    "clean_stop": ("clean_stop", "a clean stop: SIGTERM to exit (sets the work pools' grace)"),
    "rollouts": ("rollouts", "agentic rollouts with heavy-tailed tool latency"),
    "scale_costs": ("scale_costs", "bookkeeping at 1k-100k shards (no model)"),
    "report_memory": ("report_memory", "the report's memory at 100k and 1M rows (no model)"),
    "peers_ray": ("peers_ray", "side by side with Ray Data LLM (make bench-peers)"),
    "peers_ray_sweep": ("peers_ray_sweep", "Ray Data LLM's batch knobs, heavy-tailed rows"),
    "fleet_sim": ("fleet_sim", "a simulated 16-node fleet at Kimi-K2-Thinking's timings (no model)"),
    "history_turns": ("history_turns", "a rollout turn's prompt at up to ~185k tokens of "
                                       "history (no model)"),
    "long_horizon": ("long_horizon", "rollouts of 50-300 tool calls through the pipeline, "
                                     "generation scripted (no model)"),
    "rollouts_tail": ("rollouts_tail", "agentic rollouts, tool latency heavy-tailed enough that "
                                  "the turn-synchronous loop idles >= 25%"),
}
# scale_costs: minutes of synthetic outputs; peers_*: need Ray, which `make bench-peers`
# installs beside the product; fleet_sim: ~10 minutes of both cores; history_turns: a few
# minutes of one core; long_horizon, rollouts_tail: ~4 minutes each. Run them with --only NAME.
OPT_IN = {"scale_costs", "peers_ray", "peers_ray_sweep", "fleet_sim", "history_turns",
          "long_horizon", "rollouts_tail"}
NO_MODEL = {"scale_costs", "report_memory", "fleet_sim", "history_turns", "long_horizon"}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", choices=list(BENCHMARKS),
                   help="run only this benchmark (repeatable)")
    p.add_argument("--model", help="model dir or hub name (default: the generated miniature)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="K=V",
                   help="engine argument, YAML value: EngineSpec fields (max_in_flight, "
                        "tensor_parallel_size...) or any vllm.LLM argument (repeatable)")
    p.add_argument("--quick", action="store_true", help="reduced sizes, for a smoke test")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p.parse_args()


def _run_one(name: str, ctx: Context, preload: dict, host: dict, versions: dict) -> dict:
    module, title = BENCHMARKS[name]
    started = time.monotonic()
    print(f"[bench] {name}: {title} ...", file=sys.stderr, flush=True)
    result: dict = {"name": name, "title": title, "machine": host, "versions": versions,
                    "preload": preload, "context": ctx.describe(), "command": sys.argv}
    try:
        result.update(importlib.import_module(module).run(ctx))
    except Exception as e:  # one failed benchmark must not lose the others' results
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    result["notes"] = [*ctx.notes, *result.get("notes", [])]
    result["duration_s"] = time.monotonic() - started
    result["finished_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"[bench] {name}: {result['duration_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def main() -> int:
    machine.reexec_with_preload()
    args = _args()
    from context import make_context
    from summary import write_result, write_table

    names = args.only or [n for n in BENCHMARKS if n not in OPT_IN]
    work = Path(tempfile.mkdtemp(prefix="thinkbatch-bench-"))
    ctx = (make_context(args.model, args.engine_arg, args.quick, work)
           if set(names) - NO_MODEL else Context(model="", engine={}, mini=False,
                                                 quick=args.quick, work=work))
    preload, host, versions = machine.preloaded(), machine.machine(), machine.versions()
    failed = 0
    try:
        for name in names:
            result = _run_one(name, ctx, preload, host, versions)
            failed += "error" in result
            write_result(name, result)
            print(write_table(list(BENCHMARKS)), file=sys.stderr)
    finally:
        if args.keep:
            print(f"[bench] scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
