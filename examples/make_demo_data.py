"""Write the demo's prompts (arithmetic word problems and weather questions) and the
rows of examples/features.yaml (template columns and per-row overrides)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CITIES = ["paris", "tokyo", "lima", "oslo", "cairo", "delhi", "quito", "perth"]


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            city = rng.choice(CITIES)
            out.append({"id": f"demo-{i:04d}", "kind": "tool",
                        "prompt": f"What is the weather in {city.title()} right now?"})
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append({"id": f"demo-{i:04d}", "kind": "math",
                        "prompt": f"Sam has {a} apples and buys {b} more. How many now?"})
    return out


def feature_rows(n: int, seed: int = 1) -> list[dict[str, str | None]]:
    """Mostly plain rows; some override sampling, thinking or tools, a few are bad."""
    rng = random.Random(seed)
    overrides = [
        None, None, None,
        {"max_tokens": 8},  # truncated: reasoning kept, no answer
        {"structured_outputs": {"choice": ["answer sunny", "answer rainy"]}},
        {"temperature": -1},  # invalid: the row says which field
    ]
    out = []
    for i in range(n):
        sampling = overrides[i % len(overrides)]
        thinking_off = sampling and "structured_outputs" in sampling
        out.append({
            "id": f"feat-{i:04d}",
            "city": None if i % 97 == 5 else rng.choice(CITIES).title(),
            "day": rng.choice(["monday", "friday", "sunday"]),
            "sampling": json.dumps(sampling) if sampling else None,
            "tools": None,  # the job's tools apply
            "ctk": json.dumps({"thinking": False}) if thinking_off else None,
        })
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data")
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(300)), folder / "prompts.parquet", row_group_size=100)
    pq.write_table(pa.Table.from_pylist(feature_rows(120)), folder / "features.parquet")
    print(folder)
