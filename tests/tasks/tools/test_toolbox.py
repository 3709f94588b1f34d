"""The tool executors with real tools: Python functions run in threads, the example MCP
server over stdio and streamable HTTP, recorded results. No engine needed."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from miniature import tiny_tasks
from tests import processes
from tests.conftest import free_port
from thinkbatch.schemas.record import ToolResult
from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.schemas.tools import tool_errors
from thinkbatch.tasks.tools.recorded import parse_recorded
from thinkbatch.tasks.tools.tool import ToolboxError
from thinkbatch.tasks.tools.toolbox import Toolbox

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
example_tools = tiny_tasks.EXAMPLE_TOOLS  # examples/tools.py (not a package), loaded once

TEST_TOOLS = '''
"""Tools for tests."""
import asyncio
import threading
import time
from json import dumps  # imported, not defined here: not a tool
from typing import Annotated

from pydantic import BaseModel, Field

_lock = threading.Lock()
_running = 0
_peak = 0


class Point(BaseModel):
    x: int
    y: int = 0


def double(n: int) -> int:
    """Twice n."""
    return 2 * n


def boom(message: str = "kaput") -> str:
    raise RuntimeError(message)


def nap(seconds: float, tag: str = "") -> str:
    """Sleeps, counting how many naps run at once."""
    global _running, _peak
    with _lock:
        _running += 1
        _peak = max(_peak, _running)
    try:
        time.sleep(seconds)
    finally:
        with _lock:
            _running -= 1
    return tag or f"slept {seconds}"


def peak() -> int:
    return _peak


async def anap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "awake"


async def ablock(seconds: float) -> str:
    """Blocks its event loop, as a synchronous client inside an async tool does."""
    time.sleep(seconds)
    return "unblocked"


def norm(p: Point, scale: float = 1.0) -> dict:
    return {"norm": (p.x ** 2 + p.y ** 2) ** 0.5 * scale}


def route(from_: Annotated[str, Field(alias="from", description="Where to start.")],
          to: str = "home") -> str:
    """A route.

    From somewhere,
    to somewhere else."""
    return f"{from_} -> {to}"


def _helper() -> None:
    pass
'''


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    (tmp_path / "my_tools.py").write_text(TEST_TOOLS)
    return tmp_path


def spec(*sources: dict[str, Any], **over: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({"tools": list(sources), **over})


def call(name: str, arguments: Any = None, id: str | None = None, **kwargs: Any) -> dict[str, Any]:
    if arguments is None:
        arguments = json.dumps(kwargs)
    return {"id": id or f"functions.{name}:0", "name": name, "arguments": arguments}


def run(box: Toolbox, calls: list[dict[str, Any]], recorded: Any = None,
        wait_s: float = 10) -> list[ToolResult]:
    """Run one turn and wait for it; `done` must come exactly once, off this thread."""
    got: list[tuple[list[ToolResult], str]] = []
    finished = threading.Event()

    def done(results: list[ToolResult]) -> None:
        got.append((results, threading.current_thread().name))
        finished.set()

    box.run(calls, recorded, done)
    assert finished.wait(wait_s), "done was not called"
    time.sleep(0.05)
    assert len(got) == 1
    results, thread = got[0]
    assert thread != threading.current_thread().name
    assert [r.call_id for r in results] == [c["id"] for c in calls]
    return results


def test_schemas_come_from_signatures_and_docstrings():
    with Toolbox.open(spec({"python": "tools.py"}), EXAMPLES) as box:
        schemas = box.schemas()
    assert tool_errors(schemas) == []
    by_name = {s["function"]["name"]: s["function"] for s in schemas}
    assert list(by_name) == ["get_weather", "get_time", "convert_units"]
    assert by_name["get_weather"] == {
        "name": "get_weather",
        "description": "The current weather in a city: temperature in °C and the sky.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}
    assert by_name["convert_units"]["description"] == (  # hard-wrapped lines joined
        "Convert a value between units: km/miles, kg/pounds, meters/feet, liters/gallons, "
        "celsius/fahrenheit.")
    convert = by_name["convert_units"]["parameters"]
    assert convert["required"] == ["value", "from_unit", "to_unit"]
    assert convert["properties"]["value"] == {"type": "number"}
    assert "title" not in json.dumps(schemas)


def test_example_tools_are_declared_as_the_miniature_learned_them():
    """The rollout demo's toolbox declares examples/tools.py with the schemas the trained
    miniature saw in training."""
    with Toolbox.open(spec({"python": "tools.py"}), EXAMPLES) as box:
        assert box.schemas() == tiny_tasks.TOOL_SCHEMAS


def test_python_tools_ok_raise_invalid_unknown(tools_file: Path):
    with Toolbox.open(spec({"python": "my_tools.py"}), tools_file) as box:
        assert box.names == ["double", "boom", "nap", "peak", "anap", "ablock", "norm",
                             "route"]
        norm, route = (s["function"] for s in box.schemas()[-2:])
        assert norm["parameters"]["properties"]["p"]["$ref"] == "#/$defs/Point"
        assert route["description"] == "A route.\n\nFrom somewhere, to somewhere else."
        assert route["parameters"]["properties"]["from"] == {"type": "string",
                                                             "description": "Where to start."}
        results = run(box, [
            call("double", n=21),
            call("boom", message="no luck"),
            call("double", n="many"),
            call("double", n=1, extra=2),
            call("double"),
            call("double", arguments="{n: 1"),
            call("double", arguments="[1]"),
            call("nope", x=1),
            call("anap", seconds=0),
            call("norm", p={"x": 3, "y": 4}, scale=2),
            call("peak", arguments=""),
            call("route", arguments='{"from": "Oslo"}'),
        ])
    texts = [r.content for r in results]
    assert texts[0] == "42" and results[0].error is None
    assert texts[1] == "error: tool 'boom' failed: RuntimeError: no luck"
    assert texts[2].startswith("error: invalid arguments for 'double': n: Input should be a "
                               "valid integer")
    assert texts[3] == "error: invalid arguments for 'double': extra: Extra inputs are not permitted"
    assert texts[4] == "error: invalid arguments for 'double': n: Field required"
    assert texts[5].startswith("error: arguments of 'double' are not valid JSON: ")
    assert texts[6] == "error: arguments of 'double' must be a JSON object, not list"
    assert texts[7] == "error: unknown tool 'nope'"
    assert texts[8] == "awake"
    assert json.loads(texts[9]) == {"norm": 10.0}
    assert texts[10] == "0"
    assert texts[11] == "Oslo -> home"
    for r in results:
        assert (r.error is None) == (not r.content.startswith("error:"))
        assert r.error in (None, r.content)
        assert r.latency_s >= 0


def test_an_async_tool_is_cancelled_at_its_timeout_and_frees_its_slot(tools_file: Path):
    with Toolbox.open(spec({"python": "my_tools.py"}, tool_timeout_s=0.5,
                           max_concurrent_tools=1), tools_file) as box:
        started = time.monotonic()
        results = run(box, [call("anap", seconds=5), call("nap", seconds=0, tag="after")])
        elapsed = time.monotonic() - started
    assert [r.content for r in results] == ["error: tool 'anap' timed out after 0.5 s",
                                            "after"]
    assert results[0].error == results[0].content
    assert 0.5 <= results[0].latency_s < 2
    assert elapsed < 4  # one slot: the cancelled call does not keep it


def _threads(name: str) -> set[threading.Thread]:
    """Threads running calls of the tool `name`, from any toolbox: a test compares them
    with those before it, as another test's abandoned call may end meanwhile."""
    return {t for t in threading.enumerate() if t.name == f"tool-{name}"}


def test_a_blocking_async_tool_times_out_and_stalls_no_other_call(tools_file: Path):
    """An `async def` tool that blocks (time.sleep) runs off the toolbox's loop: its
    timeout fires on time, and another conversation's call is not held up."""
    with Toolbox.open(spec({"python": "my_tools.py"}, tool_timeout_s=0.5), tools_file) as box:
        blocked: list[list[ToolResult]] = []
        started = time.monotonic()
        box.run([call("ablock", seconds=3)], None, blocked.append)
        time.sleep(0.1)  # the blocking call is running
        [other] = run(box, [call("double", n=4)])
        other_s = time.monotonic() - started
        deadline = time.monotonic() + 10
        while not blocked and time.monotonic() < deadline:
            time.sleep(0.02)
        blocked_s = time.monotonic() - started
    assert other.content == "8" and other_s < 1.5
    assert blocked and blocked[0][0].content == "error: tool 'ablock' timed out after 0.5 s"
    assert blocked_s < 1.5 and blocked[0][0].latency_s < 1.5


def test_timed_out_calls_keep_their_slots_until_their_threads_end(tools_file: Path):
    """Python cannot stop a thread: a call abandoned at its timeout holds its slot until
    it returns, so the cap bounds the threads really running; with every slot held so,
    further calls fail at once rather than wait forever or start more threads."""
    hang_s = 2.0
    before = _threads("nap")
    with Toolbox.open(spec({"python": "my_tools.py"}, tool_timeout_s=0.2,
                           max_concurrent_tools=2), tools_file) as box:
        started = time.monotonic()
        results = run(box, [call("nap", id=f"c{i}", seconds=hang_s) for i in range(5)])
        elapsed = time.monotonic() - started
        threads = _threads("nap") - before
        [also_held] = run(box, [call("double", n=1)])
        time.sleep(hang_s + 0.3)  # the naps end, and their slots are free again
        [after] = run(box, [call("double", n=2)])
        [peak] = run(box, [call("peak", arguments="{}")])
    timed_out = "error: tool 'nap' timed out after 0.2 s"
    held = ("error: tool '{}' was not run: all 2 tool slots (rollout.max_concurrent_tools) "
            "are held by calls that timed out and still run")
    assert [r.content for r in results] == [timed_out] * 2 + [held.format("nap")] * 3
    assert elapsed < 1.5
    assert len(threads) == 2 and peak.content == "2"
    assert also_held.content == held.format("double")
    assert after.content == "4"
    assert not _threads("nap") - before


def test_close_does_not_wait_for_tools_that_never_return(tools_file: Path):
    box = Toolbox.open(spec({"python": "my_tools.py"}, tool_timeout_s=600), tools_file)
    got: list[list[ToolResult]] = []
    box.run([call("ablock", seconds=3600), call("nap", seconds=3600)], None, got.append)
    time.sleep(0.3)
    started = time.monotonic()
    box.close()
    assert time.monotonic() - started < 3
    assert [r.content for r in got[0]] == [
        "error: tool 'ablock' was cancelled: the toolbox closed",
        "error: tool 'nap' was cancelled: the toolbox closed"]


def test_random_sleeps_come_back_in_call_order(tools_file: Path):
    rng = random.Random(7)
    sleeps = [rng.uniform(0, 0.3) for _ in range(10)]
    calls = [call("nap", id=f"c{i}", seconds=s, tag=f"t{i}") for i, s in enumerate(sleeps)]
    with Toolbox.open(spec({"python": "my_tools.py"}), tools_file) as box:
        results = run(box, calls)
    assert [r.content for r in results] == [f"t{i}" for i in range(10)]
    assert all(r.latency_s >= s * 0.9 for r, s in zip(results, sleeps))


def test_concurrency_cap_holds_across_turns(tools_file: Path):
    nap = 0.3
    with Toolbox.open(spec({"python": "my_tools.py"}, max_concurrent_tools=2),
                      tools_file) as box:
        started = time.monotonic()
        pending = threading.Semaphore(0)
        for turn in range(3):  # three conversations' turns at once, two naps each
            box.run([call("nap", seconds=nap), call("nap", seconds=nap)], None,
                    lambda results: pending.release())
        for _ in range(3):
            assert pending.acquire(timeout=10)
        elapsed = time.monotonic() - started
        [peak] = run(box, [call("peak", arguments="{}")])
    assert peak.content == "2"
    assert elapsed >= 3 * nap * 0.9


def test_many_turns_from_many_threads_each_get_done_once(tools_file: Path):
    got: dict[str, int] = {}
    lock = threading.Lock()
    all_done = threading.Semaphore(0)

    def done(results: list[ToolResult]) -> None:
        with lock:
            for r in results:
                got[r.call_id] = got.get(r.call_id, 0) + 1
        all_done.release()

    with Toolbox.open(spec({"python": "my_tools.py"}, max_concurrent_tools=4),
                      tools_file) as box:
        def submit(t: int) -> None:
            for k in range(10):
                box.run([call("double", id=f"{t}-{k}-{j}", n=j) for j in range(3)], None, done)

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for _ in range(40):
            assert all_done.acquire(timeout=10)
    assert len(got) == 120 and set(got.values()) == {1}


def test_close_cancels_running_turns_and_still_calls_done(tools_file: Path):
    box = Toolbox.open(spec({"python": "my_tools.py"}), tools_file)
    got: list[list[ToolResult]] = []
    box.run([call("anap", seconds=30), call("nap", seconds=30)], None, got.append)
    time.sleep(0.2)
    started = time.monotonic()
    box.close()
    assert time.monotonic() - started < 3
    assert len(got) == 1
    assert [r.content for r in got[0]] == [
        "error: tool 'anap' was cancelled: the toolbox closed",
        "error: tool 'nap' was cancelled: the toolbox closed"]
    with pytest.raises(ToolboxError, match="closed"):
        box.run([call("double", n=1)], None, got.append)
    box.close()


def test_recorded_results_by_call_id_then_tool_name(tools_file: Path):
    rollout = spec({"python": "my_tools.py", "functions": ["double"]},
                   {"recorded": {"column": "results"}})
    assert rollout.recorded_column == "results"
    recorded = {"functions.get_weather:0": "21 °C and sunny", "get_time": "14:05"}
    as_map = pa.array([list(recorded.items())], pa.map_(pa.string(), pa.string())).to_pylist()[0]
    with Toolbox.open(rollout, tools_file) as box:
        assert box.names == ["double"]  # a recorded source adds no schemas
        for value in (recorded, json.dumps(recorded), as_map):
            results = run(box, [call("get_weather", city="Vienna"),
                                call("get_time", id="functions.get_time:3", arguments="{bad"),
                                call("double", n=2), call("convert_units", value=1)], value)
            assert [r.content for r in results[:3]] == ["21 °C and sunny", "14:05", "4"]
            assert results[3].error == ("error: no recorded result for call "
                                        "'functions.convert_units:0' of tool 'convert_units'")
        [missing] = run(box, [call("get_time", city="Oslo")], None)
        assert missing.error == ("error: no recorded result for call 'functions.get_time:0' "
                                 "of tool 'get_time'")
        [bad] = run(box, [call("get_time", city="Oslo")], "[1, 2, 3]")
        assert bad.error == ("error: recorded results must be an object {call id or tool "
                             "name: result}, not list")
    assert parse_recorded(None) == {}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_recorded("{oops")


def test_without_recorded_source_unknown_names_are_errors(tools_file: Path):
    with Toolbox.open(spec({"python": "my_tools.py", "functions": ["double"]}),
                      tools_file) as box:
        [r] = run(box, [call("get_time", city="Oslo")], {"get_time": "14:05"})
    assert r.error == "error: unknown tool 'get_time'"


@pytest.mark.parametrize("source, message", [
    ({"python": "missing.py"}, r"rollout.tools\[0\] \(python missing.py\): no such file"),
    ({"python": "my_tools.py", "functions": ["double", "triple"]},
     "no public function 'triple' defined there"),
    ({"python": "no_such_module.tools"}, "import failed: ModuleNotFoundError"),
    ({"python": "broken.py"}, "import failed: ZeroDivisionError"),
    ({"python": "varargs.py"}, r"function 'f' cannot be a tool: parameter \*args"),
    ({"python": "empty.py"}, "defines no public function"),
    ({"mcp": {"command": ["no-such-mcp-server"]}}, "could not start: FileNotFoundError"),
    ({"mcp": {"command": ["python", "-c", "import sys; sys.exit(3)"]}},
     "could not start: MCPError: Connection closed"),
])
def test_a_source_that_cannot_open_is_refused(tools_file: Path, source: dict[str, Any],
                                              message: str):
    (tools_file / "broken.py").write_text("x = 1 / 0\n")
    (tools_file / "varargs.py").write_text("def f(*args):\n    pass\n")
    (tools_file / "empty.py").write_text("import os\nX = 1\n")
    with pytest.raises(ToolboxError, match=message):
        Toolbox.open(spec(source), tools_file)


def test_tool_names_are_unique_across_sources(tools_file: Path):
    with pytest.raises(ToolboxError, match=r"rollout.tools\[1\] \(python my_tools.py\): tool "
                                           r"'double' is also served by rollout.tools\[0\]"):
        Toolbox.open(spec({"python": "my_tools.py"}, {"python": "my_tools.py"}), tools_file)


def test_module_import_by_name_from_the_job_folder(tools_file: Path):
    (tools_file / "pkg_tools_x").mkdir()
    (tools_file / "pkg_tools_x" / "__init__.py").write_text("")
    (tools_file / "pkg_tools_x" / "calc.py").write_text(
        "def add(a: int, b: int) -> int:\n    return a + b\n")
    with Toolbox.open(spec({"python": "pkg_tools_x.calc"}), tools_file) as box:
        [r] = run(box, [call("add", a=2, b=3)])
    assert r.content == "5"


def test_mcp_stdio_server_lists_calls_and_stops():
    before = processes.tree(os.getpid())
    rollout = spec({"mcp": {"command": ["python", "mcp_weather_server.py"]}})
    box = Toolbox.open(rollout, EXAMPLES)
    servers = {p: s for p, s in processes.tree(os.getpid()).items() if p not in before}
    try:
        assert [processes.cmdline(p) for p in servers] == [
            f"{sys.executable} mcp_weather_server.py"]
        schemas = {s["function"]["name"]: s["function"] for s in box.schemas()}
        assert list(schemas) == ["get_weather", "get_time", "convert_units"]
        assert schemas["get_weather"]["parameters"] == {
            "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
        results = run(box, [call("get_weather", city="Vienna"),
                            call("convert_units", value=3, from_unit="km", to_unit="kg"),
                            call("get_weather", town="Vienna"), call("get_time", city="Tokyo")])
    finally:
        box.close()
    assert results[0].content == example_tools.get_weather("Vienna") and results[0].error is None
    assert results[1].error == "Error executing tool convert_units: cannot convert km to kg"
    assert results[2].error is not None and "city" in results[2].error
    assert results[3].content == example_tools.get_time("Tokyo")
    assert processes.left_alive(servers, 5) == []


SLOW_SERVER = '''
import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("slow", log_level="WARNING")


@server.tool()
async def sleep(seconds: float) -> str:
    await anyio.sleep(seconds)
    return f"slept {seconds}"


server.run()
'''


def test_mcp_call_that_times_out_is_cancelled_and_the_session_goes_on(tmp_path: Path):
    (tmp_path / "slow_server.py").write_text(SLOW_SERVER)
    rollout = spec({"mcp": {"command": ["python", "slow_server.py"]}}, tool_timeout_s=0.5)
    with Toolbox.open(rollout, tmp_path) as box:
        first = run(box, [call("sleep", seconds=30), call("sleep", seconds=0)])
        [again] = run(box, [call("sleep", seconds=0.1)])
    assert [r.content for r in first] == ["error: tool 'sleep' timed out after 0.5 s",
                                          "slept 0.0"]
    assert again.content == "slept 0.1" and again.latency_s >= 0.1


OWNER = '''
import sys, time
from pathlib import Path
from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.tasks.tools.toolbox import Toolbox

spec = RolloutSpec.model_validate(
    {"tools": [{"mcp": {"command": ["python", "mcp_weather_server.py"]}}]})
box = Toolbox.open(spec, Path(sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
'''


def test_mcp_stdio_server_dies_with_a_killed_owner():
    """SIGKILL leaves no close() to run: the server must end when its stdin closes."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(EXAMPLES)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        servers = processes.tree(owner.pid)
        assert len(servers) == 1
        assert "mcp_weather_server.py" in processes.cmdline(next(iter(servers)))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert processes.left_alive(servers, 5) == []


ISOLATED_OWNER = '''
import sys, time
from pathlib import Path
from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.tasks.tools.toolbox import Toolbox

spec = RolloutSpec.model_validate(
    {"tools": [{"python": "my_tools.py", "isolated": True}], "tool_timeout_s": 600})
box = Toolbox.open(spec, Path(sys.argv[1]))
box.run([{"id": "c", "name": "nap", "arguments": '{"seconds": 600}'}], None, print)
time.sleep(60)
'''


def test_an_isolated_call_that_hangs_dies_with_a_killed_owner(tools_file: Path):
    """SIGKILL leaves no close() to run, and a worker in a hung call reads no stdin: it
    must end with its owner all the same."""
    owner = subprocess.Popen([sys.executable, "-c", ISOLATED_OWNER, str(tools_file)])
    try:
        deadline = time.monotonic() + 30
        while not (workers := processes.tree(owner.pid)):
            assert time.monotonic() < deadline and owner.poll() is None
            time.sleep(0.05)
        time.sleep(2)  # the worker imports the tools and takes the call (or not yet)
        assert len(workers) == 1
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert processes.left_alive(workers, 5) == []
    deadline = time.monotonic() + 5  # nothing else of it either
    while [p for p in os.listdir("/proc") if p.isdigit()
           and str(tools_file) in processes.cmdline(int(p))]:
        assert time.monotonic() < deadline, "a worker outlived its owner"
        time.sleep(0.1)


def test_mcp_streamable_http_server():
    port = free_port()
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "mcp_weather_server.py"),
                               "--http", str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        rollout = spec({"mcp": {"url": f"http://127.0.0.1:{port}/mcp"},
                        "functions": ["get_weather", "convert_units"]})
        with Toolbox.open(rollout, Path(".")) as box:
            assert box.names == ["get_weather", "convert_units"]
            ok, failed = run(box, [
                call("get_weather", city="Lima"),
                call("convert_units", value=1, from_unit="km", to_unit="celsius")])
    finally:
        server.terminate()
        server.wait(10)
    assert ok.content == example_tools.get_weather("Lima")
    assert failed.error == "Error executing tool convert_units: cannot convert km to celsius"
    with pytest.raises(ToolboxError, match="could not start: ConnectError"):
        Toolbox.open(rollout, Path("."))


HEADERS = Path(__file__).resolve().parents[2] / "mcp_header_server.py"


def _http_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, str(HEADERS), str(port)],
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)


def test_mcp_http_headers_are_secrets_and_a_lost_session_is_started_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A bearer token in `headers` comes from the environment, reaches the server, is
    never written; a server restarted under the session (which then no longer knows it)
    is reconnected, and calls succeed after."""
    import hashlib

    token = "tok-7c1d3f9a2b"
    monkeypatch.setenv("TB_TEST_TOKEN", token)
    port = free_port()
    rollout = spec({"mcp": {"url": f"http://127.0.0.1:{port}/mcp",
                            "headers": {"Authorization": "Bearer ${TB_TEST_TOKEN}"}}},
                   tool_timeout_s=15)
    literal = spec({"mcp": {"url": f"http://127.0.0.1:{port}/mcp",
                            "headers": {"Authorization": f"Bearer {token}"}}})
    assert token not in literal.model_dump_json()
    assert "Bearer ${TB_TEST_TOKEN}" in rollout.model_dump_json()
    caplog.set_level("WARNING", logger="thinkbatch.toolbox")
    server = _http_server(port)
    try:
        with Toolbox.open(rollout, Path(".")) as box:
            [before] = run(box, [call("authorization", arguments="{}")])
            server.terminate()
            server.wait(10)
            server = _http_server(port)
            _wait_for(lambda: any("is back" in r.getMessage() for r in caplog.records), 30)
            [after] = run(box, [call("authorization", arguments="{}")])
    finally:
        server.terminate()
        server.wait(10)
    digest = hashlib.sha256(f"Bearer {token}".encode()).hexdigest()
    assert (before.content, after.content, after.error) == (digest, digest, None)
    assert not any(token in r.getMessage() for r in caplog.records)


COUNTING = Path(__file__).resolve().parents[2] / "mcp_counting_server.py"


def _counting(starts: Path, key: str, **over: Any) -> RolloutSpec:
    return spec({"mcp": {"command": ["python", str(COUNTING)],
                         "env": {"STARTS_FILE": str(starts), "API_KEY": key}}}, **over)


def _starts(starts: Path) -> list[str]:
    return starts.read_text().split() if starts.exists() else []


CRASHY = Path(__file__).resolve().parents[2] / "mcp_crashy_server.py"


def _crashy(tmp_path: Path, **mcp: Any) -> tuple[RolloutSpec, Path]:
    starts = tmp_path / "starts"
    env = {"STARTS_FILE": str(starts), **mcp.pop("env", {})}
    return spec({"mcp": {"command": ["python", str(CRASHY)], "env": env, **mcp}},
                tool_timeout_s=10), starts


def _wait_for(predicate: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_stdio_server_that_dies_is_restarted_and_serves_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Killed between calls: found by a ping and restarted before the next call. Dying
    during a call: that call fails saying so (not repeated), the next one waits for the
    restart. Each restart is logged once, naming the server."""
    rollout, starts = _crashy(tmp_path)
    caplog.set_level("WARNING", logger="thinkbatch.toolbox")
    with Toolbox.open(rollout, tmp_path) as box:
        [first] = run(box, [call("pid", arguments="{}")])
        os.kill(int(first.content), signal.SIGKILL)
        _wait_for(lambda: len(starts.read_text().split()) == 2)
        [second] = run(box, [call("pid", arguments="{}")])
        [crashed] = run(box, [call("crash", arguments="{}")])
        [after] = run(box, [call("pid", arguments="{}")])
    pids = starts.read_text().split()
    assert len(pids) == 3 and first.content == pids[0]
    assert (second.content, second.error) == (pids[1], None)
    assert crashed.error is not None and crashed.error.startswith(
        "error: tool 'crash' failed: the MCP server rollout.tools[0] (mcp ['python', "
        f"'{CRASHY}']) was lost during the call (MCPError: Connection closed); it is "
        "being restarted, the call is not repeated")
    assert (after.content, after.error) == (pids[2], None)
    restarts = [r.getMessage() for r in caplog.records if "restarting it" in r.getMessage()]
    assert len(restarts) == 2
    assert all(m.startswith(f"toolbox: rollout.tools[0] (mcp ['python', '{CRASHY}']): "
                            "the MCP server stopped (") for m in restarts)
    # Each restart served a call: the count of restarts without one starts again.
    assert "restart 1 of at most 3" in restarts[0] and "restart 1 of at most 3" in restarts[1]
    assert len([r for r in caplog.records if "is back" in r.getMessage()]) == 2


def test_a_server_that_keeps_failing_is_down_and_its_calls_say_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Restarts are bounded (with backoff): a server that no longer starts makes its
    source down for good, its calls fail at once naming why, and the toolbox tells a
    conversation so (it ends `tool_error`)."""
    rollout, starts = _crashy(tmp_path, env={"STARTS_OK": "1"}, max_restarts=2)
    with Toolbox.open(rollout, tmp_path) as box:
        [crashed] = run(box, [call("crash", arguments="{}")])
        _wait_for(lambda: len(starts.read_text().split()) == 3)
        started = time.monotonic()
        [down] = run(box, [call("pid", arguments="{}")])
        waited = time.monotonic() - started
        why = box.unavailable([down])
        [ok] = run(box, [call("nope", arguments="{}")])
        assert box.unavailable([ok]) is None
    assert down.error == (
        "error: tool 'pid' is unavailable: the MCP server rollout.tools[0] (mcp ['python', "
        f"'{CRASHY}']) stopped (could not start: MCPError: Connection closed) and was "
        "restarted 2 times without serving a call")
    assert waited < 5  # the backoffs 0.5 s and 1 s, then at once
    assert why == "tool 'pid' is unavailable: " + down.error.split("unavailable: ", 1)[1]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no restart left" in errors[0]


def test_an_isolated_python_tool_runs_in_a_process_that_its_timeout_kills(tools_file: Path):
    """`isolated: true`: a call that hangs is killed at its timeout, so it holds neither a
    thread nor a slot; the workers are reused, and none outlives the toolbox."""
    before, nap_threads = processes.tree(os.getpid()), _threads("nap")
    rollout = spec({"python": "my_tools.py", "isolated": True}, tool_timeout_s=3,
                   max_concurrent_tools=1)
    with Toolbox.open(rollout, tools_file) as box:
        first = run(box, [call("double", n=21), call("boom", message="no luck"),
                          call("double", n="many"), call("anap", seconds=0),
                          call("norm", p={"x": 3, "y": 4})], wait_s=60)
        workers = {p: s for p, s in processes.tree(os.getpid()).items() if p not in before}
        started = time.monotonic()
        hung, after = run(box, [call("nap", seconds=600), call("double", n=2)], wait_s=60)
        elapsed = time.monotonic() - started
        threads = _threads("nap") - nap_threads
        # The killed worker is replaced by a new one: the one before served every call.
        assert len(workers) == 1 and processes.left_alive(workers, 5) == []
        later = {p: s for p, s in processes.tree(os.getpid()).items() if p not in before}
    assert [r.content for r in first] == [
        "42", "error: tool 'boom' failed: RuntimeError: no luck",
        first[2].content, "awake", '{"norm": 5.0}']
    assert first[2].content.startswith("error: invalid arguments for 'double': n: ")
    assert hung.content == "error: tool 'nap' timed out after 3 s"
    assert after.content == "4" and elapsed < 3 + 10  # one slot, freed by the kill
    assert not threads  # none started here (another test's may linger, or end meanwhile)
    assert len(later) == 1 and processes.left_alive(later, 5) == []


def test_close_kills_an_isolated_call_that_runs(tools_file: Path):
    before = processes.tree(os.getpid())
    box = Toolbox.open(spec({"python": "my_tools.py", "isolated": True}, tool_timeout_s=600),
                       tools_file)
    got: list[list[ToolResult]] = []
    box.run([call("nap", seconds=600)], None, got.append)
    deadline = time.monotonic() + 30
    while not (workers := {p: s for p, s in processes.tree(os.getpid()).items()
                           if p not in before}):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1)  # the worker imports the tools and takes the call
    started = time.monotonic()
    box.close()
    assert time.monotonic() - started < 3
    assert [r.content for r in got[0]] == ["error: tool 'nap' was cancelled: the toolbox closed"]
    assert processes.left_alive(workers, 5) == []


def test_close_does_not_wait_for_a_server_restarting(tmp_path: Path):
    """A restart under way (a server that starts slowly) is cancelled at close: close
    returns at once and the half-started server is stopped with it."""
    rollout, starts = _crashy(tmp_path, env={"STARTS_HANG": "1"})
    before = processes.tree(os.getpid())
    box = Toolbox.open(rollout, tmp_path)
    try:
        run(box, [call("crash", arguments="{}")])
        _wait_for(lambda: len(starts.read_text().split()) == 2)
        hanging = {p: s for p, s in processes.tree(os.getpid()).items() if p not in before}
    finally:
        started = time.monotonic()
        box.close()
    assert time.monotonic() - started < 5
    assert len(hanging) == 1 and processes.left_alive(hanging, 10) == []
