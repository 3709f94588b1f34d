"""Synthetic inputs: prompt tables for the engine, Kimi-format completions for replay.

A million rows must be written in seconds, so a few distinct texts are repeated with
vectorized Arrow `take`, written in slices so memory stays flat.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_WORDS = ("weather city temperature answer reason check step tool call result first then "
          "because value compare number total plan verify convert paris tokyo rain").split()


def prompts(path: Path, n: int, *, max_tokens: list[int] | None = None,
            row_group_size: int = 1024) -> Path:
    """`n` short distinct prompts; with `max_tokens`, a per-row `sampling` JSON column."""
    cols: dict[str, pa.Array] = {
        "id": pa.array([f"q{i:07d}" for i in range(n)]),
        "prompt": pa.array([f"question {i}: what is the weather in city {i % 97}?"
                            for i in range(n)]),
    }
    if max_tokens is not None:
        cols["sampling"] = pa.array([json.dumps({"max_tokens": m}) for m in max_tokens])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def _reasoning(rng: random.Random, size: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(_WORDS))
    return " ".join(words)


def kimi_texts(variants: int = 16, seed: int = 0) -> list[str]:
    """Kimi-K2-Thinking completions: 1-2 KB of reasoning, then an answer or
    (one in four) one or two tool calls in Kimi's section/call markers."""
    rng = random.Random(seed)
    texts = []
    for v in range(variants):
        head = f"<think>{_reasoning(rng, rng.randint(1024, 2048))}</think>"
        if v % 4 == 3:
            calls = "".join(
                f"<|tool_call_begin|>functions.get_weather:{k}<|tool_call_argument_begin|>"
                f'{{"city": "{rng.choice(_WORDS)}", "unit": "celsius"}}<|tool_call_end|>'
                for k in range(1 + v % 2))
            texts.append(f"{head}<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>")
        else:
            texts.append(f"{head}The answer is {_reasoning(rng, rng.randint(40, 200))}.")
    return texts


def replay_rows(path: Path, n: int, *, slice_rows: int = 65536,
                row_group_size: int = 8192) -> Path:
    """`n` rows of id, prompt and raw_text (Kimi-format completions) for the replay engine."""
    texts = pa.array(kimi_texts())
    prompts_ = pa.array([f"question {i}: what is the weather?" for i in range(64)])
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("raw_text", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n, slice_rows):
            m = min(slice_rows, n - start)
            ids = pc.binary_join_element_wise(
                "r", pa.array(np.arange(start, start + m)).cast(pa.string()), "")
            writer.write_table(pa.table({
                "id": ids,
                "prompt": prompts_.take(pa.array(np.arange(start, start + m) % len(prompts_))),
                "raw_text": texts.take(pa.array(rng.integers(0, len(texts), m))),
            }, schema=schema), row_group_size=row_group_size)
    return path
