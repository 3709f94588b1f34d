"""Agentic rollouts on the real vLLM CPU engine (the random-weight miniature, shared
in-process) with real Python tools (tests/rollout_tools.py): each turn's prompt is vLLM's
own chat rendering of the trajectory, tools that fail or stall are results the model
reads, max_turns, a prompt that outgrows the context at turn 2, samples, S3, and a
SIGKILL mid-rollout. A regex makes the random weights speak Kimi's format and choose
between an answer and the tool calls a test offers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import (CLI, ENGINE_IN_PROCESS, engine_section, job_dict,
                            kill_after_first_commit, prompt_rows, write_job, write_prompts)
from thinkbatch.flows.job import generate_dataset
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.record import Generation, RowRequest
from thinkbatch.schemas.rollout import HIDDEN
from thinkbatch.tasks import runner
from thinkbatch.tasks.rows.engine import Engine, get_engine
from thinkbatch.tasks.rows.engine_settings import may_seed

TOOLS = [{"python": "tests.rollout_tools"}]
THINK = r"<think>[a-z]{1,8}( [a-z]{1,8}){0,4}</think>"
ANSWER = r"answer [a-z]{1,8}( [a-z]{1,8}){0,3}"


def tool_call(name: str, arguments: str = r"\{\}") -> str:
    """One Kimi tool call of `name` (call index 0), arguments as a regex."""
    return (r"<\|tool_calls_section_begin\|><\|tool_call_begin\|>functions\." + name
            + r":0<\|tool_call_argument_begin\|>" + arguments
            + r"<\|tool_call_end\|><\|tool_calls_section_end\|>")


WEATHER = tool_call("get_weather", r'\{"city": "[a-z]{1,8}"\}')
# A turn of the regex is ~30 tokens as the tokenizer would write it, but the random weights
# may spell it a character at a time, Kimi's markers too (the regex matches text): room for
# that where a test must see no turn truncated (each turn draws with a seed of its own).
MARKERS_SPELLED_OUT = 256


def regex(*alternatives: str) -> str:
    return THINK + "(" + "|".join(alternatives) + ")"


def _job(tmp_path: Path, model: str, rows: int, pattern: str, out: str = "out",
         rollout: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A rollout job over `rows` prompts; `out` is a folder of tmp_path or an s3:// URL."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(rows))
    return job_dict(tmp_path / "in.parquet", out if out.startswith("s3://") else tmp_path / out,
                    engine_section(model), **{
                        "sampling": {"max_tokens": 128,
                                     "structured_outputs": {"regex": pattern}},
                        **sections,
                        "rollout": {"tools": TOOLS, "max_turns": 3, "tool_timeout_s": 0.5,
                                    **(rollout or {})}})


def _rows(data: Any, **kw: Any) -> dict[tuple[str, int], dict[str, Any]]:
    rows = ds.dataset(data, **kw).to_table().to_pylist()
    out = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(out) == len(rows), "a conversation was written twice"
    return out


def _assert_whole(row: dict[str, Any], max_turns: int) -> None:
    """A committed conversation is complete and its columns agree with each other."""
    turns, messages = row["turns"], json.loads(row["messages"])
    assistant = [m for m in messages if m["role"] == "assistant"]
    tools = [m for m in messages if m["role"] == "tool"]
    results = [r for t in turns for r in t["tool_results"] or ()]
    assert row["num_turns"] == len(turns) == len(assistant) >= 1
    assert row["tool_calls_total"] == len(results) == len(tools)
    assert row["tool_errors"] == sum(r["error"] is not None for r in results)
    assert [m["content"] for m in tools] == [r["content"] for r in results]
    assert [m["tool_call_id"] for m in tools] == [r["call_id"] for r in results]
    for turn, message in zip(turns, assistant):
        assert message["reasoning_content"] == (turn["reasoning"] or "")
        assert message["content"] == (turn["answer"] or "")
        calls = [{"id": c["id"], "name": c["function"]["name"],
                  "arguments": c["function"]["arguments"]}
                 for c in message.get("tool_calls", ())]
        assert calls == (turn["tool_calls"] or [])
    last = turns[-1]
    if row["status"] == "ok":
        assert last["answer"] and not last["tool_calls"] and row["answer"] == last["answer"]
    else:
        assert row["status"] == "max_turns" and row["num_turns"] == max_turns
        assert last["tool_calls"] and last["tool_results"] is None
    assert all(t["tool_results"] is not None for t in turns[:-1])


class Recording:
    """The shared real engine, with the prompt token ids of every request it finished."""

    def __init__(self, engine: Engine):
        self.engine, self.tokenizer, self.layout = engine, engine.tokenizer, engine.layout
        self.max_model_len = engine.max_model_len
        self.prompts: dict[str, list[int]] = {}
        self.tools: dict[str, Any] = {}
        self.ahead: dict[str, bool] = {}  # whether each request came rendered ahead
        self.rendered_on: set[str] = set()  # the threads that rendered next turns

    @property
    def in_flight(self) -> int:
        return self.engine.in_flight

    def render(self, req: RowRequest, prev: Any) -> Any:
        self.rendered_on.add(threading.current_thread().name)
        return self.engine.render(req, prev)

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        self.tools[key] = req.tools
        self.ahead[key] = req.prompt is not None
        self.engine.submit(key, req, params)

    def poll(self) -> list[Generation]:
        done = self.engine.poll()
        for gen in done:
            self.prompts[gen.key] = list(gen.prompt_token_ids)
        return done

    def guard(self, markers: Any) -> None:
        self.engine.guard(markers)

    def close(self) -> None:
        pass


@pytest.mark.engine
def test_each_turn_is_vllms_chat_rendering_of_the_trajectory(tiny_model: str,
                                                             tmp_path: Path) -> None:
    """Each turn's prompt token ids are those `LLM.chat` gives for the trajectory's
    messages up to that turn, normalized as `vllm serve` normalizes a request (its
    ChatCompletionRequest renames `reasoning_content` to `reasoning`), with the
    toolbox's tools: a trajectory is what the server would have produced. Earlier turns'
    reasoning is in the prompt (interleaved thinking)."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    job = load_job(inline=_job(tmp_path, tiny_model, 16, regex(ANSWER, WEATHER),
                               rollout={"max_turns": 4}))
    layout = runner.output(job)
    plan, _ = runner.plan(job, layout)
    engine = get_engine(job.engine, job.parsers, may_seed(job))  # the engine the job's flow runs get
    recording = Recording(engine)
    pipe = runner.open_pipeline(job, layout, plan, engine=recording).pipeline
    pipe.submit_shard(0).result(timeout=300)
    pipe.close()

    rows = _rows(layout.data)
    assert {r["status"] for r in rows.values()} <= {"ok", "max_turns"}
    prefixes, keys = [], []
    for row in rows.values():
        _assert_whole(row, 4)
        messages = json.loads(row["messages"])
        at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, i in enumerate(at):
            prefixes.append(ChatCompletionRequest(model="m", messages=messages[:i]).messages)
            keys.append(f"{row['row_index']}:0:{turn}")
    assert max(r["num_turns"] for r in rows.values()) >= 3, "no conversation of 3 turns"
    (tools,) = {json.dumps(recording.tools[k]) for k in keys}
    assert [t["function"]["name"] for t in json.loads(tools)] == [
        "get_weather", "explode", "stall", "nap", "encyclopedia"]
    outs = engine.llm.chat(prefixes, SamplingParams(max_tokens=1), tools=json.loads(tools),
                           use_tqdm=False)
    for key, out in zip(keys, outs):
        assert recording.prompts[key] == list(out.prompt_token_ids), key
    # Turns after the first came rendered ahead, incrementally, on the render thread.
    assert {k for k in keys if recording.ahead[k]} == {k for k in keys
                                                       if not k.endswith(":0")}
    assert {name.split("_")[0] for name in recording.rendered_on} == {"thinkbatch-render"}
    # The second turn's prompt holds the first turn's reasoning, as Kimi's template puts it.
    row = next(r for r in rows.values() if r["num_turns"] >= 2)
    prompt = engine.tokenizer.decode(recording.prompts[f"{row['row_index']}:0:1"])
    assert f"<think>{row['turns'][0]['reasoning']}</think>" in prompt
    assert "## Return of functions.get_weather:0\n21 °C and sunny in " in prompt


@pytest.mark.engine
def test_tools_that_raise_stall_sleep_or_do_not_exist_and_samples(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    pattern = regex(ANSWER, WEATHER, *(tool_call(n) for n in ("explode", "stall", "nap",
                                                             "no_such_tool")))
    job = _job(tmp_path, tiny_model, 12, pattern)
    job["sampling"]["n"] = 2
    manifest = generate_dataset(job)

    rows = _rows(tmp_path / "out" / "data")
    assert sorted(rows) == [(f"q{i:05d}", s) for i in range(12) for s in range(2)]
    for row in rows.values():
        _assert_whole(row, 3)
    results = [r for row in rows.values() for t in row["turns"] for r in t["tool_results"] or ()]
    expect = {"explode": ("exploded: boom", True), "stall": ("timed out after 0.5 s", True),
              "nap": ("slept ", False), "no_such_tool": ("unknown tool 'no_such_tool'", True),
              "get_weather": ("21 °C and sunny in ", False)}
    for r in results:
        text, failed = expect[r["name"]]
        assert text in r["content"] and (r["error"] is not None) == failed, r
    assert len({r["name"] for r in results}) >= 3, [r["name"] for r in results]
    assert any(rows[k, 0]["messages"] != rows[k, 1]["messages"] for k, _ in rows)
    assert (manifest.turns, manifest.tool_calls_total, manifest.tool_errors) == (
        sum(r["num_turns"] for r in rows.values()), len(results),
        sum(r["error"] is not None for r in results))
    assert sum(manifest.status_counts.values()) == 24


@pytest.mark.engine
def test_max_turns_and_a_prompt_that_outgrows_the_context_at_turn_two(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    always = _job(tmp_path, tiny_model, 4, regex(WEATHER), out="always")
    always["sampling"]["max_tokens"] = MARKERS_SPELLED_OUT
    generate_dataset(always)
    generate_dataset(_job(tmp_path, tiny_model, 4, regex(tool_call("encyclopedia")),
                          out="long"))

    for row in _rows(tmp_path / "always" / "data").values():
        _assert_whole(row, 3)
        assert (row["status"], row["num_turns"], row["tool_calls_total"]) == ("max_turns", 3, 2)
        assert row["error"] == "turn 3: still calling tools after rollout.max_turns (3) turns"
    for row in _rows(tmp_path / "long" / "data").values():
        assert (row["status"], row["num_turns"], row["tool_calls_total"]) == (
            "prompt_too_long", 1, 1)
        # vLLM's renderer refuses a prompt longer than the context itself.
        assert row["error"].startswith("turn 2: This model's maximum context length is 1024")
        assert row["finish_reason"] is None and row["turns"][0]["tool_results"]


@pytest.mark.engine
def test_a_history_past_the_window_goes_on_with_earlier_tool_results_hidden(
        tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    """rollout.context: a tool result longer than the window ends the conversation at
    turn 2 under `stop`; under `hide_tool_results` (keep_last 0) it is hidden and the
    conversation goes on to max_turns, each earlier result a placeholder in the messages
    the model read (call ids kept) and whole in `turns`; the manifest counts them."""
    pattern = regex(tool_call("encyclopedia"))
    stop = generate_dataset(_job(tmp_path, tiny_model, 2, pattern, out="stop",
                                 rollout={"context": {"policy": "stop"}}))
    hiding = _job(tmp_path, tiny_model, 2, pattern, out="hide", rollout={
        "context": {"policy": "hide_tool_results", "keep_last": 0}})
    hiding["sampling"]["max_tokens"] = MARKERS_SPELLED_OUT  # no turn truncated
    hide = generate_dataset(hiding)

    for row in _rows(tmp_path / "stop" / "data").values():
        assert (row["status"], row["num_turns"]) == ("prompt_too_long", 1)
        assert row["error"].startswith("turn 2: ")
    assert not stop.this_run.tool_results_hidden
    for row in _rows(tmp_path / "hide" / "data").values():
        assert (row["status"], row["num_turns"], row["tool_calls_total"]) == ("max_turns", 3, 2)
        tools = [m for m in json.loads(row["messages"]) if m["role"] == "tool"]
        results = [r for t in row["turns"] for r in t["tool_results"] or ()]
        assert [m["content"] for m in tools] == [HIDDEN, HIDDEN]
        assert [m["tool_call_id"] for m in tools] == [r["call_id"] for r in results]
        assert all(r["content"].startswith("everything: lorem") for r in results)
        assert row["prompt_tokens"] < 3 * 1024
    assert hide.this_run.tool_results_hidden == 4
    assert hide.this_run.turns_rerendered == 4


@pytest.mark.engine
def test_rollout_output_on_s3(s3, tiny_model: str, prefect_harness, tmp_path: Path) -> None:
    bucket = s3.bucket("rollouts")
    manifest = generate_dataset(_job(tmp_path, tiny_model, 6, regex(ANSWER, WEATHER),
                                     out=f"s3://{bucket}/out"))

    fs = pafs.S3FileSystem(endpoint_override=f"{s3.host}:{s3.port}", scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    rows = _rows(f"{bucket}/out/data", filesystem=fs)
    assert len(rows) == 6
    for row in rows.values():
        _assert_whole(row, 3)
    assert manifest.turns == sum(r["num_turns"] for r in rows.values())


@pytest.mark.engine
def test_tools_served_by_an_mcp_stdio_server(tiny_model: str, prefect_harness,
                                             tmp_path: Path) -> None:
    """The example MCP server (the `mcp` package over stdio, started and stopped by the
    run) answers the model's get_weather calls with the same text as examples/tools.py."""
    from examples.tools import get_weather

    job = _job(tmp_path, tiny_model, 6, regex(WEATHER), rollout={
        "tools": [{"mcp": {"command": ["python", "examples/mcp_weather_server.py"]}}],
        "max_turns": 2, "tool_timeout_s": 30})
    job["sampling"]["max_tokens"] = MARKERS_SPELLED_OUT
    generate_dataset(job)

    rows = _rows(tmp_path / "out" / "data")
    assert len(rows) == 6
    for row in rows.values():
        _assert_whole(row, 2)
        (call,) = row["turns"][0]["tool_calls"]
        (result,) = row["turns"][0]["tool_results"]
        city = json.loads(call["arguments"])["city"]
        assert (result["name"], result["error"]) == ("get_weather", None)
        assert result["content"] == get_weather(city)


@pytest.mark.engine
def test_kill_mid_rollout_then_resume_writes_every_conversation_once_and_whole(
        tiny_model: str, tmp_path: Path) -> None:
    """Tools sleep a random time, so at the first commit conversations are at every
    stage; the rerun redoes only those in flight, each from its first turn or its last
    saved one (rollout.checkpoint_seconds)."""
    n, in_flight, flush = 64, 16, 8
    spec = _job(tmp_path, tiny_model, n, regex(ANSWER, WEATHER, tool_call("nap")),
                rollout={"max_turns": 4, "max_concurrent_tools": 4},
                output={"flush_rows": flush}, shards={"rows_per_shard": 32})
    spec["engine"]["max_in_flight"] = in_flight
    job = write_job(tmp_path / "job.yaml", spec)
    submitted = kill_after_first_commit(job)
    data = tmp_path / "out" / "data"
    first_parts = set(data.glob("*.parquet"))
    first = [r for p in sorted(first_parts) for r in pq.read_table(p).to_pylist()]
    assert 0 < len(first) < n
    for row in first:
        _assert_whole(row, 4)

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **ENGINE_IN_PROCESS})
    assert r.returncode == 0, r.stderr
    second = [r for p in sorted(set(data.glob("*.parquet")) - first_parts)
              for r in pq.read_table(p).to_pylist()]
    assert sorted(r["row_index"] for r in first + second) == list(range(n))  # each once
    for row in second:
        _assert_whole(row, 4)
    redone = submitted & {r["row_index"] for r in second}
    assert len(redone) < in_flight + 4 + flush, (len(redone), len(submitted))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["turns"] == sum(r["num_turns"] for r in first + second)


@pytest.mark.engine
def test_a_killed_rollout_resumes_each_conversation_at_its_last_saved_tool_call(
        tiny_model: str, tmp_path: Path) -> None:
    """Open conversations are saved at every turn boundary (`checkpoint_seconds: 0`), so
    after a SIGKILL the rerun continues them from their saved tool results: calls that
    ran and were saved do not run again (their results, written by the first run's
    process, are in the rows), each conversation is one row, and whole."""
    n, in_flight, tools = 48, 16, 4
    tally = tmp_path / "tally"
    spec = _job(tmp_path, tiny_model, n, regex(ANSWER, tool_call(
        "lookup", r'\{"city": "[a-z]{1,8}"\}')), rollout={
        "tools": [{"python": "tests.rollout_tally"}], "max_turns": 4,
        "max_concurrent_tools": tools, "checkpoint_seconds": 0},
        output={"flush_rows": 32}, shards={"rows_per_shard": 48})
    spec["engine"]["max_in_flight"] = in_flight
    spec["sampling"]["max_tokens"] = MARKERS_SPELLED_OUT
    job = write_job(tmp_path / "job.yaml", spec)
    env = {"TALLY_FILE": str(tally)}
    submitted = kill_after_first_commit(job, env=env)
    ran_first = {line.split()[0] for line in tally.read_text().splitlines()}
    data = tmp_path / "out" / "data"
    first_parts = set(data.glob("*.parquet"))
    first = [r for p in sorted(first_parts) for r in pq.read_table(p).to_pylist()]
    open_at_kill = submitted - {r["row_index"] for r in first}
    assert (tmp_path / "out" / "_open").exists()

    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **ENGINE_IN_PROCESS, **env})
    assert r.returncode == 0, r.stderr
    second = [r for p in sorted(set(data.glob("*.parquet")) - first_parts)
              for r in pq.read_table(p).to_pylist()]
    assert sorted(r["row_index"] for r in first + second) == list(range(n))  # each once
    for row in first + second:
        _assert_whole(row, 4)

    def tokens(row: dict[str, Any]) -> list[str]:
        return [res["content"].rsplit(": ", 1)[1] for t in row["turns"]
                for res in t["tool_results"] or ()]

    kept = [t for row in first + second for t in tokens(row)]
    assert len(kept) == len(set(kept))
    ran = {line.split()[0] for line in tally.read_text().splitlines()}
    ran_second = ran - ran_first
    # Resumed: rows of the rerun whose earlier turns' results are the first run's.
    resumed = [row for row in second if set(tokens(row)) & ran_first]
    assert resumed, "no conversation was resumed from its saved turns"
    for row in resumed:
        marks = [t in ran_first for t in tokens(row)]
        assert marks == sorted(marks, reverse=True), marks  # the first run's, then the rerun's
        assert row["row_index"] in open_at_kill
    # The rerun ran no call twice, and of the first run's calls only those whose results
    # were not yet saved at the kill (at most one turn of each open conversation) are lost.
    assert ran_second == set(kept) - ran_first
    lost = ran_first - set(kept)
    assert len(lost) <= len(open_at_kill) + tools, (len(lost), len(open_at_kill))
    assert not [p for p in (tmp_path / "out" / "_open").rglob("*") if p.is_file()]


def test_a_rollout_job_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   {"kind": "replay", "tokenizer": "assets/tiny-kimi-thinking"},
                   parsers={"tool_call": None},
                   tools=[{"type": "function", "function": {"name": "get_weather"}}],
                   rollout={"tools": [{"python": "no/such/tools.py"}]})
    r = subprocess.run([*CLI, "run", str(write_job(tmp_path / "job.yaml", job))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "rollout: needs engine.kind vllm" in r.stderr
    assert "rollout: needs parsers.tool_call" in r.stderr
    assert "rollout.tools[0] (python no/such/tools.py): no such file" in r.stderr
    assert not (tmp_path / "out").exists()

    job["rollout"] = {"tools": TOOLS}
    r = subprocess.run([*CLI, "validate", str(write_job(tmp_path / "job.yaml", job))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tools: get_weather also served by rollout.tools" in r.stderr


@pytest.mark.engine
def test_a_run_starts_each_mcp_server_once_and_writes_no_secret(tiny_model: str,
                                                                tmp_path: Path) -> None:
    """`thinkbatch run`: the CLI checks the job, the flow checks it again, the worker opens
    its tools; the MCP server starts once, with the key it was given. No file the run
    writes (output folder, Prefect's database) and nothing it prints holds the key, and a
    rerun with the key rotated is the same job: it resumes instead of being refused."""
    import hashlib
    import os

    secret, rotated = "sk-live-a1b2c3d4e5f6", "sk-live-6f5e4d3c2b1a"
    starts = tmp_path / "starts"

    spec = _job(tmp_path, tiny_model, 4, regex(WEATHER), rollout={
        "tools": [{"mcp": {"command": ["python", "tests/mcp_counting_server.py"],
                           "env": {"STARTS_FILE": str(starts)}}}],
        "max_turns": 2, "tool_timeout_s": 30})
    spec["sampling"]["max_tokens"] = MARKERS_SPELLED_OUT

    def run(key: str) -> subprocess.CompletedProcess[str]:
        spec["rollout"]["tools"][0]["mcp"]["env"]["API_KEY"] = key
        job = write_job(tmp_path / "job.yaml", spec)
        return subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, **ENGINE_IN_PROCESS,
                                   "PREFECT_HOME": str(tmp_path / "prefect")})

    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    first = run(secret)
    assert first.returncode == 0, first.stderr
    assert starts.read_text().split() == [sha(secret)]
    rows = _rows(tmp_path / "out" / "data")
    assert len(rows) == 4 and all(r["tool_calls_total"] for r in rows.values())
    assert {r["turns"][0]["tool_results"][0]["error"] for r in rows.values()} == {None}

    again = run(rotated)
    assert again.returncode == 0, again.stderr
    assert starts.read_text().split() == [sha(secret), sha(rotated)]  # its checks only
    files = [p for folder in ("out", "prefect") for p in (tmp_path / folder).rglob("*")
             if p.is_file()]
    assert any(p.name == "_manifest.json" for p in files)
    assert any(p.suffix == ".db" for p in files)
    leaks = [str(p) for p in files for key in (secret, rotated) if key.encode() in p.read_bytes()]
    leaks += [out for r in (first, again) for out in (r.stdout, r.stderr)
              if secret in out or rotated in out]
    assert leaks == []
