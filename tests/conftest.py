"""Shared fixtures: tiny Parquet inputs, the miniature Kimi-K2 model, a Prefect harness.

The engine is shared: `tasks.engine.get_engine` keeps one per process and spec, so every
test that runs the same ENGINE spec in-process pays the ~20 s load once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkbatch.schemas.job_file import resolve_raw
from thinkbatch.schemas.output import ROW_TIME_NAMES
from thinkbatch.tasks.report import trace

os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

MODEL_DIR_ENV = "THINKBATCH_TINY_MODEL"

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TRAINED_MODEL = ASSETS / "tiny-kimi-thinking"  # real weights, the Hugging Face tokenizer
# The same weights with a tokenizer of Kimi-K2-Thinking's own class (a slow tokenizer over
# tiktoken, loaded with trust_remote_code; miniature/tiktoken_tokenizer.py): the same ids.
TIKTOKEN_MODEL = ASSETS / "tiny-kimi-thinking-tiktoken"
TOKENIZERS = ("hf", "tiktoken")  # the two classes of tokenizer the engine tests run with
# Columns that differ between two runs of the same rows: tests that compare runs drop them.
PER_RUN_COLUMNS = frozenset({"ttft_s", "latency_s", *ROW_TIME_NAMES})


def tokenizer_engine(tokenizer: str) -> dict[str, Any]:
    """The engine fields that pick the miniature's `tokenizer` ("hf" or "tiktoken"): the
    tiktoken one is the model folder that ships it, with trust_remote_code, as Kimi's."""
    if tokenizer == "hf":
        return {"model": str(TRAINED_MODEL)}
    return {"model": str(TIKTOKEN_MODEL), "trust_remote_code": True}

# Forces Kimi-format text out of random weights: reasoning in think tags, then either
# an answer or one tool call in Kimi's section/call markers. The demos' preset holds it.
KIMI_REGEX = resolve_raw({}, preset="random-miniature")["sampling"]["structured_outputs"]["regex"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from miniature.tiny_model import write_tiny_model

    target = os.environ.get(MODEL_DIR_ENV) or str(tmp_path_factory.mktemp("models") / "tiny-kimi")
    return str(write_tiny_model(target))


@pytest.fixture(scope="session")
def tiny_tiktoken_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The random-weight miniature with the tokenizer of Kimi-K2-Thinking's class."""
    from miniature.tiktoken_tokenizer import write_tiktoken_model

    return str(write_tiktoken_model(tiny_model, tmp_path_factory.mktemp("models") / "tiktoken"))


def engine_section(model: str, preset: str = "random-miniature", **over: Any) -> dict[str, Any]:
    """The one engine spec the in-process engine tests share: the CPU settings the demos
    name (deployments/presets/), the model, then `over`."""
    return {**resolve_raw({}, preset=preset)["engine"], "model": model, **over}


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
    from thinkbatch.tasks.rows.engine import close_engines

    close_engines()


@pytest.fixture
def own_engines():
    """Engines a test loads for settings no other test shares are shut down after it,
    not kept for the session beside the shared one."""
    from thinkbatch.tasks.rows import engine

    before = set(map(id, engine._ENGINES.values()))
    yield
    for loaded in [e for e in engine._ENGINES.values() if id(e) not in before]:
        engine.drop_engine(loaded)


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
# vLLM's engine core and its worker inside the run's process, not in two spawned processes
# of their own: each spawn imports vLLM and torch again (~15 s of CPU apiece), and two CLI
# runs side by side took 124 s with them, 69 s without. For the subprocess tests whose
# subject is rows, storage, claims or the flow. The tests of the engine's processes
# (test_orphans, test_signals, test_engine_death, test_worker_stops, test_engine's close)
# and `make demo` run vLLM's own process layout, as a user's run does.
ENGINE_IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_after_first_commit(job: Path | list[str], env: dict[str, str] | None = None) -> set[int]:
    """Run `thinkbatch run JOB` (or the command given as a list of arguments), its engine
    in process (ENGINE_IN_PROCESS), SIGKILL its process group right after its first
    commit; returns the row indices it had submitted to the engine by then, as its trace
    (tasks/report/trace.py) tells."""
    args = job if isinstance(job, list) else ["run", str(job)]
    with tempfile.TemporaryDirectory() as tmp:
        path, log = Path(tmp, "trace.jsonl"), Path(tmp, "stderr")
        with log.open("w") as stderr:
            proc = subprocess.Popen([*CLI, *args, "--no-progress"],
                                    env={**os.environ, **ENGINE_IN_PROCESS, **(env or {}),
                                         trace.ENV: str(path)},
                                    stderr=stderr, stdout=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            for event in trace.follow(path, lambda: proc.poll() is None):
                if event["event"] == trace.COMMITTED:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, \
            f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        return {e["row"] for e in trace.read(path) if e["event"] == trace.SUBMITTED}


class S3Endpoint:
    """moto's server mode on 127.0.0.1: a real HTTP S3 endpoint for boto3 and pyarrow."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.url = f"http://{self.host}:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._server.stop()

    def start_again(self) -> None:
        """Same port, same objects: moto's state lives in this process, not the server."""
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


@pytest.fixture(scope="session")
def s3() -> S3Endpoint:
    """Credentials and endpoint through the environment, as a user's shell would have
    them; subprocesses inherit them. boto3 honours AWS_ENDPOINT_URL."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    endpoint = S3Endpoint()
    os.environ["AWS_ENDPOINT_URL"] = endpoint.url
    yield endpoint
    endpoint.stop()
