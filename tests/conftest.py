"""Shared fixtures: tiny Parquet inputs, the miniature Kimi-K2 model, a Prefect harness.

The engine is shared: `tasks.engine.get_engine` keeps one per process and spec, so every
test that runs the same ENGINE spec in-process pays the ~20 s load once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

MODEL_DIR_ENV = "THINKBATCH_TINY_MODEL"

# Forces Kimi-format text out of random weights: reasoning in think tags, then either
# an answer or one tool call in Kimi's section/call markers.
KIMI_REGEX = (
    r"<think>[a-z]{1,8}( [a-z]{1,8}){0,4}</think>"
    r"(answer [a-z]{1,8}( [a-z]{1,8}){0,3}"
    r"|<\|tool_calls_section_begin\|><\|tool_call_begin\|>functions\.get_weather:0"
    r"<\|tool_call_argument_begin\|>\{\"city\": \"[a-z]{1,8}\"\}<\|tool_call_end\|>"
    r"<\|tool_calls_section_end\|>)"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from thinkbatch.tasks.tiny_model import write_tiny_model

    target = os.environ.get(MODEL_DIR_ENV) or str(tmp_path_factory.mktemp("models") / "tiny-kimi")
    return str(write_tiny_model(target))


def engine_section(model: str, **over: Any) -> dict[str, Any]:
    """The one engine spec the in-process engine tests share."""
    return {
        "model": model,
        "load_format": "dummy",
        "max_model_len": 1024,
        "kv_cache_memory_bytes": 256 * 2**20,
        "max_in_flight": 64,
        "extra_args": {"block_size": 16, "enforce_eager": True},
        **over,
    }


def write_prompts(path: Path, rows: list[dict[str, Any]], row_group_size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def prompt_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"q{i:05d}", "prompt": f"question number {i}: what is the weather?",
             "topic": "weather" if i % 2 else "math"} for i in range(start, start + n)]


@pytest.fixture(scope="session", autouse=True)
def _close_engines_at_exit():
    """Stop the shared engine's process while pytest's streams are still open."""
    yield
    from thinkbatch.tasks.engine import close_engines

    close_engines()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def job_dict(inputs: Path, out: Path, engine: dict[str, Any], **sections: Any) -> dict[str, Any]:
    job = {
        "name": "test",
        "input": {"path": str(inputs), "id_column": "id", "prompt_column": "prompt",
                  "passthrough_columns": ["topic"]},
        "shards": {"rows_per_shard": 50},
        "engine": engine,
        "sampling": {"temperature": 0.8, "max_tokens": 256, "seed": 1,
                     "structured_outputs": {"regex": KIMI_REGEX}},
        "parsers": {"reasoning": "kimi_k2", "tool_call": "kimi_k2"},
        "output": {"path": str(out), "flush_rows": 32, "flush_seconds": 30},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


CLI = [sys.executable, "-m", "thinkbatch.flows.cli"]
