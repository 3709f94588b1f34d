"""Measure the trained miniature Kimi-K2 through the real `thinkbatch run` CLI.

Writes held-out prompts (never trained on) and runs them twice, greedy, with the kimi_k2
reasoning and tool-call parsers: through examples/demo.yaml (one turn, no tools
declared), each output row scored against the expected answer or tool call; and through
examples/demo-rollout.yaml, the same prompts as conversations (a rollout job: the Python
tools of examples/tools.py declared and run, each result rendered into the next turn),
each conversation scored with tiny_tasks.score_rollout. The figures go to
benchmarks/results/tiny_model_eval.json.

    .venv/bin/python -m miniature.eval_tiny_model [--model DIR] [--rows 200] [--out FILE]
    .venv/bin/python -m miniature.eval_tiny_model --score OUTPUT   # figures of a rollout's output
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from miniature.tiny_tasks import (
    heldout_rows,
    score,
    score_rollout,
    summarize,
    summarize_rollouts,
)

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "tiny_model_eval.json"
DEMO_JOB = ROOT / "examples" / "demo.yaml"  # the demo's engine, sampling and parsers
ROLLOUT_JOB = ROOT / "examples" / "demo-rollout.yaml"  # the same, as a rollout with tools
# What the trained model must reach; the engine tests assert looser bounds on fewer rows.
TARGETS = {"formatted_rate": 0.95, "tool_call_accuracy": 0.90, "math_accuracy": 0.80}
CONVERSATION_TARGETS = {"answered_rate": 0.95, "states_value_rate": 0.90,
                        "tool_call_accuracy": 0.90}


def run(job: Path, model: Path, rows: list[dict[str, Any]],
        root: Path) -> tuple[list[dict[str, Any]], float]:
    """One `thinkbatch run` of `job` over `rows`: its output rows and seconds."""
    pq.write_table(pa.Table.from_pylist(rows), root / f"{job.stem}.parquet")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "thinkbatch.flows.cli", "run", str(job),
                    "--set", f"input.path={root / f'{job.stem}.parquet'}",
                    "--set", f"output.path={root / job.stem}", "--set", f"engine.model={model}",
                    "--no-progress", "--show-rows", "0"], check=True, cwd=ROOT)
    seconds = time.monotonic() - start
    return read_output(root / job.stem), seconds


def read_output(path: Path) -> list[dict[str, Any]]:
    return ds.dataset(path / "data", format="parquet").to_table().to_pylist()


def statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}


def first_turns(model: Path, rows: int) -> dict[str, Any]:
    """The demo job as it is: one turn, no tools declared."""
    with tempfile.TemporaryDirectory() as tmp:
        got, seconds = run(DEMO_JOB, model, heldout_rows(rows), Path(tmp))
    figures = summarize([(r["kind"], score(r, r["kind"], r["expected"])) for r in got])
    return {**figures, "status_counts": statuses(got), "run_seconds": round(seconds, 1)}


def rollout_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A rollout's output rows (with the `kind` and `expected` columns) scored: per
    conversation, and its first turns as the single-turn figures (tools declared)."""
    scores = [(r["kind"], score_rollout(r, r["kind"], r["expected"])) for r in rows]
    first = [(r["kind"], score((r["turns"] or [r])[0], r["kind"], r["expected"]))
             for r in rows]
    return {"first_turn_with_tools": summarize(first), **summarize_rollouts(scores),
            "turns": sum(r["num_turns"] for r in rows),
            "tool_calls": sum(r["tool_calls_total"] for r in rows),
            "tool_errors": sum(r["tool_errors"] for r in rows), "status_counts": statuses(rows)}


def headline(f: dict[str, Any]) -> str:
    """The rollout figures in a line, as the demo prints them."""
    return (f"{f['conversations']} conversations ({f['tool_conversations']} with a tool): "
            f"answered {f['answered_rate']:.1%}, right tool calls {f['tool_call_accuracy']:.1%}, "
            f"answer states the tool's value {f['states_value_rate']:.1%}, arithmetic right "
            f"{f['math_accuracy']:.1%}; {f['turns']} turns, {f['tool_calls']} tool calls, "
            f"{f['tool_errors']} tool errors")


def conversations(model: Path, rows: int) -> dict[str, Any]:
    """The rollout demo job: tools declared, calls run, turns until an answer."""
    with tempfile.TemporaryDirectory() as tmp:
        got, seconds = run(ROLLOUT_JOB, model, heldout_rows(rows), Path(tmp))
    return {**rollout_figures(got), "run_seconds": round(seconds, 1)}


def evaluate(model: Path, rows: int) -> dict[str, Any]:
    single, chats = first_turns(model, rows), conversations(model, rows)
    meets = (all(single[k] >= v for k, v in TARGETS.items())
             and all(chats[k] >= v for k, v in CONVERSATION_TARGETS.items()))
    return {
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "sampling": "greedy (temperature 0), max_tokens 160",
        "parsers": "kimi_k2 reasoning + kimi_k2 tool_call",
        **single,
        "targets": TARGETS,
        "conversations": {"job": str(ROLLOUT_JOB.relative_to(ROOT)), **chats,
                          "targets": CONVERSATION_TARGETS},
        "meets_targets": meets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "tiny-kimi-thinking")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--score", type=Path, default=None, metavar="OUTPUT",
                        help="only print the figures of a rollout job's output folder")
    args = parser.parse_args()
    if args.score is not None:
        print(headline(rollout_figures(read_output(args.score))))
        return
    result = evaluate(args.model.resolve(), args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["meets_targets"] else 1)


if __name__ == "__main__":
    main()
