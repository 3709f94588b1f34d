"""The rollout loop in-process (tasks/rows/conversation.py through tasks/rows/pipeline.py): real tools
(tests/rollout_tools.py in tasks/tools.Toolbox), real Kimi parsers, real Parquet; the
engine is the replay engine with a script of each row's turns, since random weights
cannot be told what to say at turn 2. tests/flows/test_rollout.py runs the real engine.

A script gives each row the completion text of each of its turns; which turn a request
is comes from the request itself (the assistant messages in its history), so a turn
that is resubmitted or comes late still gets its own text.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.output import Status
from thinkbatch.schemas.record import Generation, RowRequest
from thinkbatch.tasks import runner
from thinkbatch.tasks.rows.engine import EngineDied, ReplayEngine, RequestRejected, as_served
from thinkbatch.tasks.rows.pipeline import Pipeline
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage

TOKENIZER = "assets/tiny-kimi-thinking"  # the committed miniature: its tokenizer only
WAIT_S = 20


def call(*calls: tuple[str, dict[str, Any]]) -> str:
    """A Kimi turn that thinks, then calls tools."""
    body = "".join(f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>"
                   f"{json.dumps(args)}<|tool_call_end|>" for i, (name, args) in enumerate(calls))
    return (f"<think>I need a tool</think><|tool_calls_section_begin|>{body}"
            "<|tool_calls_section_end|>")


def answer(text: str) -> str:
    return f"<think>I know now</think>{text}"


class Script(ReplayEngine):
    """Replay whose completion is the row's text for the turn the request is at. Each
    step takes `step_s`; `finish` maps (row, turn) to a finish reason, `reject` to the
    status of a RequestRejected (as VllmEngine raises), `die` is a (row, turn) whose first
    submit finds the engine dead."""

    def __init__(self, job: JobSpec, turns: dict[int, list[str]], step_s: float = 0.0,
                 finish: dict[tuple[int, int], str] | None = None,
                 reject: dict[tuple[int, int], Any] | None = None,
                 die: tuple[int, int] | None = None):
        super().__init__(job.engine)
        self.turns, self.step_s = turns, step_s
        self.finish, self.reject, self.die = finish or {}, reject or {}, die
        self.submitted: list[tuple[int, int, list[dict[str, Any]], list[dict] | None]] = []
        self._turn_of: dict[str, tuple[int, int]] = {}

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        turn = 1 + sum(m["role"] == "assistant" for m in req.messages or ())
        at = (req.row_index, turn)
        if at == self.die:
            self.die = None
            raise EngineDied("the engine core died")
        if at in self.reject:
            raise RequestRejected(self.reject[at], "prompt of 2000 tokens + max_tokens 256 "
                                                   "exceeds max_model_len 1024")
        self.submitted.append((req.row_index, turn, list(req.messages or ()), req.tools))
        self._turn_of[key] = at
        req = RowRequest(req.row_index, req.row_id, (),
                         replay_text=self.turns[req.row_index][turn - 1])
        super().submit(key, req, params)

    def poll(self) -> list[Generation]:
        if self.in_flight and self.step_s:
            time.sleep(self.step_s)
        done = super().poll()
        for gen in done:
            gen.finish_reason = self.finish.get(self._turn_of[gen.key], gen.finish_reason)
        return done


def _job(tmp_path: Path, rows: int, **rollout: Any) -> JobSpec:
    write_prompts(tmp_path / "in.parquet",
                  [{**r, "raw_text": ""} for r in prompt_rows(rows)])
    return load_job(inline={
        "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id",
                  "passthrough_columns": ["topic"]},
        "shards": {"rows_per_shard": 50},
        "engine": {"kind": "replay", "tokenizer": TOKENIZER,
                   "max_in_flight": rollout.pop("max_in_flight", 512)},
        "parsers": {"reasoning": "kimi_k2", "tool_call": "kimi_k2"},
        "output": {"path": str(tmp_path / "out"), "flush_seconds": 60,
                   "flush_rows": rollout.pop("flush_rows", 1000)},
        "rollout": {"tools": [{"python": "tests.rollout_tools"}], "tool_timeout_s": 0.5,
                    **rollout},
    })


def _pipeline(job: JobSpec, engine: Script, restart_engine: Any = None,
              **kw: Any) -> tuple[Pipeline, OutputLayout]:
    opened, layout = _opened(job, engine, restart_engine, **kw)
    return opened.pipeline, layout


def _opened(job: JobSpec, engine: Script, restart_engine: Any = None,
            **kw: Any) -> tuple[runner.Opened, OutputLayout]:
    """The runner's pipeline (its tools opened as a run's are) on the test's engine."""
    layout = runner.output(job)
    plan, _ = runner.plan(job, layout)
    return runner.open_pipeline(job, layout, plan, engine=engine, restart=restart_engine,
                                **kw), layout


def _run(job: JobSpec, engine: Script, **kw: Any) -> dict[tuple[int, int], dict[str, Any]]:
    pipe, layout = _pipeline(job, engine, **kw)
    pipe.submit_shard(0).result(timeout=WAIT_S)
    pipe.close()
    return _rows(layout)


def _rows(layout: OutputLayout) -> dict[tuple[int, int], dict[str, Any]]:
    rows = [r for p in layout.parts_of(0) for r in layout.store.open_parquet(p).read().to_pylist()]
    out = {(r["row_index"], r["sample_index"]): r for r in rows}
    assert len(out) == len(rows), "a conversation was written twice"
    return out


def test_a_tool_call_then_an_answer_is_one_row_with_its_whole_trajectory(
        tmp_path: Path) -> None:
    job = _job(tmp_path, 1)
    engine = Script(job, {0: [call(("get_weather", {"city": "Vienna"})),
                              answer("It is 21 °C and sunny in Vienna.")]})

    rows = _run(job, engine)

    row = rows[0, 0]
    assert (row["status"], row["error"], row["answer"], row["reasoning"]) == (
        "ok", None, "It is 21 °C and sunny in Vienna.", "I know now")
    assert (row["num_turns"], row["tool_calls_total"], row["tool_errors"]) == (2, 1, 0)
    first, second = row["turns"]
    assert first["tool_calls"] == [{"id": "functions.get_weather:0", "name": "get_weather",
                                    "arguments": '{"city": "Vienna"}'}]
    (result,) = first["tool_results"]
    assert (result["call_id"], result["name"], result["content"], result["error"]) == (
        "functions.get_weather:0", "get_weather", "21 °C and sunny in Vienna", None)
    assert second | {"completion_tokens": None} == {
        "reasoning": "I know now", "answer": "It is 21 °C and sunny in Vienna.",
        "tool_calls": None, "tool_results": None, "completion_tokens": None,
        "finish_reason": "stop"}
    user = {"role": "user", "content": "question number 0: what is the weather?"}
    call_message = {"role": "assistant", "content": "", "reasoning_content": "I need a tool",
                    "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                    "function": {"name": "get_weather",
                                                 "arguments": '{"city": "Vienna"}'}}]}
    tool_message = {"role": "tool", "tool_call_id": "functions.get_weather:0",
                    "name": "get_weather", "content": "21 °C and sunny in Vienna"}
    assert json.loads(row["messages"]) == [
        user, call_message, tool_message,
        {"role": "assistant", "content": "It is 21 °C and sunny in Vienna.",
         "reasoning_content": "I know now"}]
    # Each turn was asked with the whole history and the toolbox's tools.
    assert [(r, t, m) for r, t, m, _ in engine.submitted] == [
        (0, 1, [user]), (0, 2, [user, call_message, tool_message])]
    tools = engine.submitted[0][3]
    assert [t["function"]["name"] for t in tools] == [
        "get_weather", "explode", "stall", "nap", "encyclopedia"]
    assert checkpoint.done_stats(OutputLayout(job.output.path, Storage()), 0).model_dump(
        include={"turns", "tool_calls_total", "tool_errors"}) == {
        "turns": 2, "tool_calls_total": 1, "tool_errors": 0}


def test_failing_tools_are_results_the_model_reads_not_failed_rows(tmp_path: Path) -> None:
    """A tool that raises, one that times out, one that does not exist, arguments that
    do not fit: four errors in one turn, each the text of its tool message; the row is ok."""
    job = _job(tmp_path, 1)
    engine = Script(job, {0: [call(("explode", {"reason": "on purpose"}), ("stall", {}),
                                   ("no_such_tool", {}), ("get_weather", {"town": "Graz"})),
                              answer("Nothing worked.")]})

    started = time.monotonic()
    row = _run(job, engine)[0, 0]

    assert time.monotonic() - started < 5  # stall (10 s) was abandoned at 0.5 s
    assert (row["status"], row["num_turns"], row["tool_calls_total"], row["tool_errors"]) == (
        "ok", 2, 4, 4)
    results = row["turns"][0]["tool_results"]
    assert [r["call_id"] for r in results] == [
        "functions.explode:0", "functions.stall:1", "functions.no_such_tool:2",
        "functions.get_weather:3"]
    assert all(r["content"] == r["error"] for r in results)
    assert "exploded: on purpose" in results[0]["error"]
    assert "timed out after 0.5 s" in results[1]["error"]
    assert "unknown tool 'no_such_tool'" in results[2]["error"]
    assert "invalid arguments" in results[3]["error"]
    assert results[1]["latency_s"] == pytest.approx(0.5, abs=0.3)
    tool_messages = [m for m in json.loads(row["messages"]) if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [r["error"] for r in results]


def bad_call(arguments: str) -> str:
    """A Kimi turn calling get_weather with `arguments` as written (not a JSON object)."""
    return ("<think>I need a tool</think><|tool_calls_section_begin|><|tool_call_begin|>"
            f"functions.get_weather:0<|tool_call_argument_begin|>{arguments}"
            "<|tool_call_end|><|tool_calls_section_end|>")


def test_malformed_calls_are_answered_until_max_malformed_turns_in_a_row(
        tmp_path: Path) -> None:
    """Arguments that are not a JSON object: the model reads the error as the tool
    message and goes on; only more than rollout.max_malformed_turns such turns in a row
    end the conversation parse_error, naming the turn."""
    job = _job(tmp_path, 3, max_malformed_turns=2)
    good = call(("get_weather", {"city": "Oslo"}))
    engine = Script(job, {0: [bad_call('{"city": "Oslo"'), answer("Sunny.")],
                          1: [bad_call("[1]"), bad_call("42"), good, bad_call("[]"),
                              bad_call("[]"), answer("Done.")],
                          2: [bad_call("[1]")] * 3})

    rows = _run(job, engine)

    assert (rows[0, 0]["status"], rows[0, 0]["num_turns"], rows[0, 0]["tool_errors"]) == (
        "ok", 2, 1)
    (result,) = rows[0, 0]["turns"][0]["tool_results"]
    assert "arguments of 'get_weather' are not valid JSON" in result["error"]
    tool_messages = [m for m in json.loads(rows[0, 0]["messages"]) if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [result["error"]]
    # Two in a row, a good call, two more: the count is of turns in a row.
    assert (rows[1, 0]["status"], rows[1, 0]["num_turns"], rows[1, 0]["tool_errors"]) == (
        "ok", 6, 4)
    assert (rows[2, 0]["status"], rows[2, 0]["num_turns"]) == ("parse_error", 3)
    assert rows[2, 0]["error"].startswith(
        "turn 3: tool_calls[0].arguments is not a JSON object")
    assert "rollout.max_malformed_turns 2" in rows[2, 0]["error"]


def test_max_turns_ends_a_conversation_that_keeps_calling_tools(tmp_path: Path) -> None:
    job = _job(tmp_path, 1, max_turns=3)
    engine = Script(job, {0: [call(("get_weather", {"city": "Oslo"}))] * 3})

    row = _run(job, engine)[0, 0]

    assert (row["status"], row["num_turns"], row["tool_calls_total"]) == ("max_turns", 3, 2)
    assert row["error"] == "turn 3: still calling tools after rollout.max_turns (3) turns"
    assert row["tool_calls"][0]["name"] == "get_weather"  # the last turn's, never run
    assert row["turns"][2]["tool_results"] is None
    roles = [m["role"] for m in json.loads(row["messages"])]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


def test_a_failed_turn_ends_the_conversation_with_its_status_and_the_turn_named(
        tmp_path: Path) -> None:
    job = _job(tmp_path, 4)
    weather = call(("get_weather", {"city": "Rome"}))
    engine = Script(job, {0: [weather, weather, answer("cut")],
                          1: [weather, "<think>text after<|tool_call_end|> a marker"],
                          2: [weather, "<think>nothing"],
                          3: [weather, weather]},
                    finish={(0, 3): "length", (2, 2): "abort"},
                    reject={(3, 2): Status.PROMPT_TOO_LONG})

    rows = _run(job, engine)

    assert {i: (r["status"], r["error"].split(":")[0], r["num_turns"])
            for (i, _), r in rows.items()} == {
        0: ("truncated", "turn 3", 3), 1: ("parse_error", "turn 2", 2),
        2: ("engine_error", "turn 2", 2), 3: ("prompt_too_long", "turn 2", 1)}
    assert rows[3, 0]["error"].startswith("turn 2: prompt of 2000 tokens")
    # The trajectory holds the turns that parsed: the failed one is in `turns` only.
    assert [m["role"] for m in json.loads(rows[0, 0]["messages"])] == [
        "user", "assistant", "tool", "assistant", "tool"]
    assert rows[1, 0]["raw_text"].startswith("<think>text after")


def test_samples_are_conversations_of_their_own(tmp_path: Path) -> None:
    job = _job(tmp_path, 2)
    job.sampling.n = 3  # a replay job file may not ask for samples; the feeder makes them
    engine = Script(job, {i: [call(("get_weather", {"city": f"c{i}"})), answer(f"done {i}")]
                          for i in range(2)})

    rows = _run(job, engine)

    assert sorted(rows) == [(i, s) for i in range(2) for s in range(3)]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert all(r["num_turns"] == 2 and r["answer"] == f"done {i}" for (i, _), r in rows.items())
    assert len(engine.submitted) == 12


def test_no_barrier_a_slow_tool_delays_only_its_own_conversation(tmp_path: Path) -> None:
    """Row 0's tool stalls (abandoned at 0.5 s); rows 1-3 go through their three turns
    each meanwhile, one request at a time: row 0's second turn comes last."""
    job = _job(tmp_path, 4, max_in_flight=1)
    quick = [call(("get_weather", {"city": "a"})), call(("get_weather", {"city": "b"})),
             answer("done")]
    engine = Script(job, {0: [call(("stall", {})), answer("late")], 1: quick, 2: quick,
                          3: quick}, step_s=0.01)

    rows = _run(job, engine)

    assert {r["status"] for r in rows.values()} == {"ok"}
    order = [(r, t) for r, t, _, _ in engine.submitted]
    assert order.index((0, 2)) == len(order) - 1  # every other turn went first
    assert order[:1] == [(0, 1)]


class Counting(Script):
    """Counts the conversations open at each submit: first turn submitted, last turn
    not yet finished (a conversation's row is written as its last turn finishes)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.open_at_submit: list[int] = []
        self._started: set[int] = set()
        self._ended: set[int] = set()

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        super().submit(key, req, params)
        self._started.add(req.row_index)
        self.open_at_submit.append(len(self._started - self._ended))

    def poll(self) -> list[Generation]:
        done = super().poll()
        for gen in done:
            row, turn = self._turn_of[gen.key]
            if turn == len(self.turns[row]):
                self._ended.add(row)
        return done


def test_open_conversations_stay_within_the_engine_and_the_tool_pool(tmp_path: Path) -> None:
    """max_in_flight 2 + max_concurrent_tools 1: at most 3 conversations open at once,
    so conversations in flight go ahead of new rows and memory stays bounded."""
    job = _job(tmp_path, 12, max_in_flight=2, max_concurrent_tools=1)
    script = [call(("nap", {})), call(("get_weather", {"city": "x"})), answer("done")]
    engine = Counting(job, {i: script for i in range(12)}, step_s=0.005)

    rows = _run(job, engine)

    assert {(r["status"], r["num_turns"]) for r in rows.values()} == {("ok", 3)}
    assert max(engine.open_at_submit) == 3, engine.open_at_submit


def test_a_dead_engine_resubmits_the_turn_a_conversation_is_at(tmp_path: Path) -> None:
    job = _job(tmp_path, 3)
    quick = [call(("get_weather", {"city": "x"})), answer("done")]
    turns = {i: quick for i in range(3)}
    first = Script(job, turns, die=(1, 2))
    second = Script(job, turns)

    rows = _run(job, first, restart_engine=lambda dead: second)

    assert {(r["status"], r["num_turns"]) for r in rows.values()} == {("ok", 2)}
    assert (1, 2) in {(r, t) for r, t, _, _ in second.submitted}
    assert (1, 2) not in {(r, t) for r, t, _, _ in first.submitted}


def test_a_stop_leaves_conversations_in_flight_to_the_rerun_which_does_each_once(
        tmp_path: Path) -> None:
    """Stopped while row 0 waits for its tool: rows that ended are committed whole, row 0
    is not written at all; a rerun generates only row 0, from its first turn."""
    job = _job(tmp_path, 3, tool_timeout_s=2.0)
    turns = {0: [call(("stall", {})), answer("late")],
             1: [answer("one")], 2: [call(("get_weather", {"city": "x"})), answer("two")]}
    first = Script(job, turns)
    opened, layout = _opened(job, first)
    pipe = opened.pipeline
    done = pipe.submit_shard(0)
    deadline = time.monotonic() + WAIT_S
    while opened.progress.rows < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert opened.progress.rows == 2 and pipe.conversations.at_tools
    pipe.stop()
    assert done.cancelled()
    kept = _rows(layout)
    assert sorted(kept) == [(1, 0), (2, 0)] and kept[2, 0]["num_turns"] == 2

    second = Script(job, turns)
    rows = _run(job, second)

    assert sorted(rows) == [(0, 0), (1, 0), (2, 0)]
    assert [(r, t) for r, t, _, _ in second.submitted] == [(0, 1), (0, 2)]
    assert rows[0, 0]["num_turns"] == 2 and rows[0, 0]["tool_errors"] == 1


class Holding(Script):
    """Never finishes a conversation's third turn: what a kill leaves in the engine."""

    def __init__(self, job: JobSpec, turns: dict[int, list[str]]):
        super().__init__(job, turns)
        self.held: list[str] = []

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        if sum(m["role"] == "assistant" for m in req.messages or ()) == 2:
            self.held.append(key)
        else:
            super().submit(key, req, params)


def test_a_rerun_resumes_each_conversation_at_its_last_saved_turn_and_runs_no_tool_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left in its third turn, each conversation was saved once its second tool call
    returned (checkpoint_seconds 0): the rerun asks only the third turn, from the saved
    history, and no tool runs twice; the rows are whole and the open files gone."""
    tally = tmp_path / "tally"
    monkeypatch.setenv("TALLY_FILE", str(tally))
    job = _job(tmp_path, 3, tools=[{"python": "tests.rollout_tally"}], checkpoint_seconds=0)
    turns = {r: [call(("lookup", {"city": f"a{r}"})), call(("lookup", {"city": f"b{r}"})),
                 answer(f"done {r}")] for r in range(3)}
    first = Holding(job, turns)
    pipe, layout = _pipeline(job, first)
    done = pipe.submit_shard(0)
    deadline = time.monotonic() + WAIT_S
    while len(first.held) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    pipe.stop()
    assert done.cancelled() and _rows(layout) == {}
    folder = Path(layout.open_conversations(0))
    assert sorted(p.name for p in folder.iterdir()) == ["0-0.json", "1-0.json", "2-0.json"]
    # Each result's text is saved once, in its tool message (the turn's copy restored from
    # it on resume).
    for saved in folder.iterdir():
        text = saved.read_text()
        assert [text.count(f"looked up {x}") for x in ("a", "b")] == [1, 1]

    second = Script(job, turns)
    rows = _run(job, second)

    assert sorted((r, t) for r, t, _, _ in second.submitted) == [(0, 3), (1, 3), (2, 3)]
    calls = tally.read_text().splitlines()
    assert sorted(c.split()[1] for c in calls) == sorted(
        f"{x}{r}" for x in "ab" for r in range(3))  # each call ran once
    for (row_index, _), row in rows.items():
        assert (row["status"], row["answer"], row["num_turns"]) == (
            "ok", f"done {row_index}", 3)
        messages = json.loads(row["messages"])
        assert [m["role"] for m in messages] == [
            "user", "assistant", "tool", "assistant", "tool", "assistant"]
        (asked,) = [m for r, _, m, _ in second.submitted if r == row_index]
        assert asked == messages[:5]  # the saved history, as the first run left it
        results = [x["content"] for t in row["turns"] for x in t["tool_results"] or ()]
        assert results == [m["content"] for m in messages if m["role"] == "tool"]
    assert {r.split(": ")[-1] for row in rows.values() for t in row["turns"]
            for r in (x["content"] for x in t["tool_results"] or ())} == {
        c.split()[0] for c in calls}
    assert not list(folder.iterdir())


class OnDisk(Script):
    """Reads, at each later turn's submit, the conversation's saved state as a kill would
    find it on disk."""

    def __init__(self, job: JobSpec, turns: dict[int, list[str]], layout: OutputLayout):
        super().__init__(job, turns)
        self.output = layout
        self.found: list[tuple[int, int, bool]] = []  # (row, turn, saved messages == asked)

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        turn = 1 + sum(m["role"] == "assistant" for m in req.messages or ())
        if turn > 1:
            path = Path(self.output.open_conversation(0, req.row_index, 0))
            saved = json.loads(path.read_text())["messages"] if path.exists() else None
            self.found.append((req.row_index, turn, saved == list(req.messages or ())))
        super().submit(key, req, params)


def test_saving_every_turn_a_turn_is_generated_only_once_its_state_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint_seconds 0: a conversation's next turn waits until the state its tools
    left is written, so a kill never finds a turn generated on results not on disk (it
    would regenerate it, and the turns after). Storage is slowed so that an unawaited
    save would be late."""
    from thinkbatch.tasks.store import open_conversations

    write = open_conversations.write

    def slow(*args: Any) -> None:
        time.sleep(0.05)
        write(*args)

    monkeypatch.setattr(open_conversations, "write", slow)
    job = _job(tmp_path, 3, checkpoint_seconds=0)
    turns = {r: [call(("lookup", {"city": f"c{r}{t}"})) for t in range(3)] + [answer("ok")]
             for r in range(3)}
    layout = runner.output(job)
    engine = OnDisk(job, turns, layout)
    rows = _run(job, engine)
    assert all(row["status"] == "ok" for row in rows.values())
    assert sorted((r, t) for r, t, _ in engine.found) == [
        (r, t) for r in range(3) for t in (2, 3, 4)]
    assert all(same for _, _, same in engine.found)


def test_a_row_tool_that_shadows_a_toolbox_tool_is_invalid(tmp_path: Path) -> None:
    job = _job(tmp_path, 1)
    job.tools = [{"type": "function", "function": {"name": "get_weather"}}]
    engine = Script(job, {0: [answer("never")]})

    row = _run(job, engine)[0, 0]

    assert row["status"] == "invalid_input" and "get_weather" in row["error"]
    assert row["num_turns"] is None and engine.submitted == []


def test_the_idle_driver_waits_on_tools_without_spinning(tmp_path: Path) -> None:
    """One conversation, its tool abandoned at 0.5 s, the engine idle meanwhile: the
    driver blocks on the tools' results instead of polling in a loop."""
    job = _job(tmp_path, 1)
    engine = Script(job, {0: [call(("stall", {})), answer("late")]})
    polls = 0
    poll = engine.poll

    def counting() -> list[Generation]:
        nonlocal polls
        polls += 1
        return poll()

    engine.poll = counting  # type: ignore[method-assign]
    _run(job, engine)
    assert polls < 50, polls


def test_history_is_rendered_as_vllm_serve_passes_it_and_never_changed() -> None:
    """`reasoning_content` reaches vLLM's chat parsing as `reasoning` (what the server's
    request model does); the tool calls handed over are copies, since vLLM decodes their
    arguments in place and the trajectory keeps them as JSON text."""
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "reasoning_content": "think",
                "tool_calls": [{"id": "functions.f:0", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]}]
    before = json.dumps(history)

    served = as_served(history)
    served[1]["tool_calls"][0]["function"]["arguments"] = {}

    assert served[0] is history[0]
    assert served[1]["reasoning"] == "think" and "reasoning_content" not in served[1]
    assert json.dumps(history) == before


class Seeds(Script):
    """Records the seed each (row, sample, turn) was asked with."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.seeds: dict[tuple[int, int, int], int] = {}

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        row, sample, turn = map(int, key.split(":"))
        self.seeds[row, sample, turn] = params.seed
        super().submit(key, req, params)


def test_each_turn_draws_from_its_own_seed_the_same_on_every_run(tmp_path: Path) -> None:
    """Turn 0 keeps the sample's seed (single-turn jobs' rule); a later turn gets one
    derived from (that seed, turn), so it does not replay turn 0's random draws, and a
    rerun asks every turn with the same seed as before."""
    job = _job(tmp_path, 2)
    job.engine.kind = "vllm"  # the pipeline seeds a vLLM engine's requests only
    job.sampling.seed, job.sampling.temperature, job.sampling.n = 100, 1.0, 2
    script = [call(("get_weather", {"city": "x"})), call(("get_weather", {"city": "y"})),
              answer("done")]
    first = Seeds(job, {0: script, 1: script})
    _run(job, first)
    again = Seeds(job, {0: script, 1: script})
    _run(job.model_copy(update={"output": job.output.model_copy(
        update={"path": str(tmp_path / "again")})}), again)

    assert len(first.seeds) == 2 * 2 * 3 and again.seeds == first.seeds
    assert {k: s for k, s in first.seeds.items() if k[2] == 0} == {
        (row, sample, 0): 100 + row * 2 + sample for row in range(2) for sample in range(2)}
    assert len(set(first.seeds.values())) == len(first.seeds)  # no two turns alike
    assert all(0 <= s < 2**63 for s in first.seeds.values())
    from thinkbatch.tasks.rows.sampling import turn_seed

    assert all(seed == turn_seed(100 + row * 2 + sample, turn)
               for (row, sample, turn), seed in first.seeds.items())


def test_a_tool_source_down_for_good_ends_its_conversations_tool_error(
        tmp_path: Path) -> None:
    """An MCP server that died and does not come back: the conversation that met it is
    written `tool_error`, the turn and the server named, its trajectory kept; not `ok`
    with only tool_errors counting."""
    crashy = Path(__file__).resolve().parents[2] / "mcp_crashy_server.py"
    job = _job(tmp_path, 1, tools=[{"mcp": {
        "command": ["python", str(crashy)], "max_restarts": 0,
        "env": {"STARTS_FILE": str(tmp_path / "starts"), "STARTS_OK": "1"}}}],
        tool_timeout_s=10)
    engine = Script(job, {0: [call(("crash", {})), call(("pid", {})), call(("pid", {})),
                              answer("never")]})

    row = _run(job, engine)[0, 0]

    assert row["status"] == "tool_error"
    assert row["error"].startswith(f"turn {row['num_turns']}: tool '")
    assert f"is unavailable: the MCP server rollout.tools[0] (mcp ['python', '{crashy}']) " \
           "stopped (MCPError: Connection closed) and was restarted 0 times" in row["error"]
    assert row["num_turns"] in (1, 2) and row["tool_errors"] == row["num_turns"]
    roles = [m["role"] for m in json.loads(row["messages"])]
    assert roles == ["user"] + ["assistant", "tool"] * row["num_turns"]


def test_tool_calls_failing_beyond_max_tool_error_rate_stop_the_job(tmp_path: Path) -> None:
    """Tools that fail (here every call) stop the job with a clear message once more
    than rollout.max_tool_error_rate of 20 calls or more failed; nothing is written."""
    from thinkbatch.tasks.tools.tool import ToolboxError

    job = _job(tmp_path, 3, max_tool_error_rate=0.5)
    calls = call(*[("explode", {"reason": f"n{i}"}) for i in range(8)])
    engine = Script(job, {r: [calls, calls, answer("done")] for r in range(3)})
    pipe, layout = _pipeline(job, engine)

    with pytest.raises(ToolboxError) as stopped:
        pipe.submit_shard(0).result(timeout=WAIT_S)
    pipe.close()

    # Judged when the third conversation's results come back (24 calls), or later if
    # other turns' results had arrived by then.
    found = re.fullmatch(
        r"rollout.max_tool_error_rate \(0.5\) exceeded: (\d+) of \1 tool calls failed "
        r"\(100%\); the job stops, its open conversations are not written \(a rerun resumes "
        r"them\). The last error: error: tool 'explode' failed: RuntimeError: exploded: n\d",
        str(stopped.value))
    assert found and 24 <= int(found.group(1)) <= 48, str(stopped.value)
    assert _rows(layout) == {}


def test_a_long_conversation_keeps_its_text_not_each_turns_prompt_ids(tmp_path: Path) -> None:
    """Each turn's generation carries the ids of its whole prompt, the history so far: a
    conversation that kept them held turns x history (~1.1 GB at 300 turns ending at 185k
    tokens). What it keeps grows with its text. Measured with tracemalloc over 40 turns
    of ~1,000 tokens each."""
    job = _job(tmp_path, 1)
    opened, _ = _opened(job, Script(job, {0: []}))
    conversations = opened.pipeline.conversations
    req = RowRequest(0, "r0", (), messages=[{"role": "user", "content": "weather?"}])
    conv = conversations.conversation(0, conversations.prepare(req), 0)
    try:
        for turn in range(41):
            if turn == 1:  # after the parser's first use (its classes, its patterns)
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
            gen = Generation(f"0:0:{turn}", answer(f"turn {turn}: " + "sunny and warm " * 60),
                             list(range(20_000, 21_000)), "stop",
                             list(range(20_000, 21_000 + 1_000 * turn)), None, None)
            assert conversations.turn_done(conv, gen, None) is not None
            del gen
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        opened.pipeline.close()
    text = len(json.dumps(conv.messages, ensure_ascii=False))
    assert held < 3 * text, (held, text)
    assert [t.prompt_tokens for t in conv.turns] == [1_000 * (t + 1) for t in range(41)]
