"""Write the demo's prompts: arithmetic word problems and weather questions."""

from __future__ import annotations

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


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data") / "prompts.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(300)), target, row_group_size=100)
    print(target)
