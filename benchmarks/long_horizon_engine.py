"""The long-horizon benchmark's engine and driver (benchmarks/long_horizon.py).

    python benchmarks/long_horizon_engine.py PYTHON -m thinkbatch.flows.cli run JOB ...

runs `thinkbatch run` in this process with `runner.get_engine` swapped for
`ScriptedEngine` (as sim_worker.py swaps in the fleet's), configured by the JSON file
that LONG_HORIZON_CONFIG names. Generation costs nothing but a fixed step; the render is
the product's own (`Histories.next` over the miniature's chat template and tokenizer, on
the render thread), so what a turn costs the host is what is measured.

A conversation's user message names it ("conversation 7"); it calls get_weather until its
target number of turns (`targets`), then answers. What it records, written at close:
the render thread's CPU per turn, the driver thread's CPU between engine polls charged to
the turns of the batch it handled, prompt tokens per turn, and the memory Python holds
(tracemalloc, when the config asks: it slows every allocation, so not in a timed run) or
RSS against the text of the open conversations. Every submit and finish is appended to
the tally file, so a killed run and its rerun can be compared; with `kill_after_done`
the engine SIGKILLs its process group once that many turns have finished (a kill at a
point set in turns, whatever the machine's load).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thinkbatch.schemas.record import Generation, RowRequest

CALL = ("<think>Turn {turn}: the weather again, for the record.</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{{"city": "c{conv}t{turn}"}}<|tool_call_end|>'
        "<|tool_calls_section_end|>")
ANSWER = "<think>Enough turns.</think>The weather was recorded {turn} times."
_CONV = re.compile(r"conversation (\d+)")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def targets(n: int, low: int, high: int) -> list[int]:
    """Each conversation's number of turns: spread evenly from `low` to `high`."""
    return [low + (high - low) * i // max(n - 1, 1) for i in range(n)]


def _rss() -> int:
    if tracemalloc.is_tracing():
        return tracemalloc.get_traced_memory()[0]
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _text_bytes(messages: list[dict[str, Any]]) -> int:
    """The conversation's text: every message's content, reasoning and call arguments."""
    total = 0
    for m in messages:
        total += len((m.get("content") or "").encode())
        total += len((m.get("reasoning_content") or "").encode())
        for c in m.get("tool_calls") or ():
            total += len(c["function"]["arguments"].encode()) if "function" in c else 0
    return total


class ScriptedEngine:
    """The Engine protocol (tasks/rows/engine.py) with the real render and scripted
    completions: a tool call per turn until the conversation's target, then an answer."""

    def __init__(self, config: dict[str, Any]):
        from history_turns import _offline

        from thinkbatch.tasks.rows.engine import text_renderer
        from thinkbatch.tasks.rows.history import Histories
        from thinkbatch.tasks.rows.prompt_tokens import ControlTokens

        self._offline = _offline("hf")
        self.tokenizer = self._offline.renderer.get_tokenizer()
        self.layout = None
        self.max_model_len = config["max_model_len"]
        self._targets = config["targets"]
        self._step_s = config["step_s"]
        self._out = Path(config["stats"])
        self._kill_after = config.get("kill_after_done")
        self._done_count = 0
        if config.get("tracemalloc"):
            tracemalloc.start()
        self._tally = open(config["tally"], "a", buffering=1)  # noqa: SIM115 (closed at close)
        self._text = text_renderer(self._offline)
        self._control, self._histories = ControlTokens, Histories
        self._render_h = Histories(self._text, ControlTokens(self.tokenizer))
        self._lock = threading.Lock()
        self._pending: list[tuple[Generation, int, int]] = []
        self.render_cpu: dict[int, list[float]] = defaultdict(list)
        self.driver_cpu: dict[int, list[float]] = defaultdict(list)
        self.prompt_tokens: dict[int, list[int]] = defaultdict(list)
        self.open_text: dict[int, int] = {}
        self.rss: list[tuple[float, int, int, int]] = []  # (t, rss, open text, open convs)
        self._handled: list[int] = []  # turns of the batch the driver handles now
        self._driver_since: float | None = None
        self._t0 = time.monotonic()
        self._last_sample = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def guard(self, markers: Iterable[str]) -> None:
        self._render_h = self._histories(self._text, self._control(self.tokenizer, markers))

    @staticmethod
    def _where(req: RowRequest) -> tuple[int, int]:
        msgs = req.messages or []
        conv = int(_CONV.search(next(m["content"] for m in msgs if m["role"] == "user"))[1])
        return conv, 1 + sum(m["role"] == "assistant" for m in msgs)

    def render(self, req: RowRequest, prev: Any) -> Any:
        started = time.thread_time()
        history = self._render_h.next(prev, req.messages or [], req.tools,
                                      req.chat_template_kwargs,
                                      allow_special_tokens=req.allow_special_tokens)
        if history is not None:
            history.ready = history.ids.tolist()
        spent = time.thread_time() - started
        conv, turn = self._where(req)
        text = _text_bytes(req.messages or [])  # outside the timed part
        with self._lock:
            self.render_cpu[turn].append(spent)
            self.open_text[conv] = text
        return history

    def submit(self, key: str, req: RowRequest, params: Any) -> None:
        conv, turn = self._where(req)
        done = turn >= self._targets[conv]
        text = (ANSWER if done else CALL).format(conv=conv, turn=turn)
        self._pending.append((Generation(key=key, text=text, token_ids=(), finish_reason="stop",
                                         prompt_token_ids=None, ttft_s=None, latency_s=None),
                              conv, turn))
        if req.prompt is not None:
            self.prompt_tokens[turn].append(len(req.prompt))
            req.prompt.ready = None  # as the vLLM engine: the engine holds its own
        self._tally.write(f"submit {conv} {turn}\n")

    def poll(self) -> list[Generation]:
        now = time.thread_time()
        if self._driver_since is not None and self._handled:
            share = (now - self._driver_since) / len(self._handled)
            for turn in self._handled:
                self.driver_cpu[turn].append(share)
        self._handled = []
        if not self._pending:
            self._driver_since = None
            return []
        time.sleep(self._step_s)
        batch, self._pending = self._pending, []
        for _, conv, turn in batch:
            self._tally.write(f"done {conv} {turn}\n")
            self._done_count += 1
            if turn >= self._targets[conv]:
                with self._lock:
                    self.open_text.pop(conv, None)
        self._handled = [turn for _, _, turn in batch]
        t = time.monotonic() - self._t0
        if t - self._last_sample >= 0.25:
            self._last_sample = t
            with self._lock:
                sample = (t, _rss(), sum(self.open_text.values()), len(self.open_text))
            self.rss.append(sample)
            self._tally.write("memory {:.2f} {} {} {}\n".format(*sample))
        if self._kill_after is not None and self._done_count >= self._kill_after:
            if tracemalloc.is_tracing():  # who holds the memory, by line, at the kill
                for stat in tracemalloc.take_snapshot().statistics("lineno")[:12]:
                    where = stat.traceback[0]
                    self._tally.write(f"holder {stat.size} {where.filename}:{where.lineno}\n")
            self._tally.flush()
            os.killpg(os.getpgrp(), signal.SIGKILL)
        self._driver_since = time.thread_time()
        return [g for g, _, _ in batch]

    def abort(self, keys: Iterable[str]) -> None:
        drop = set(keys)
        self._pending = [p for p in self._pending if p[0].key not in drop]

    def close(self) -> None:
        if self._tally.closed:
            return
        self._tally.close()
        self._out.write_text(json.dumps({
            "render_cpu": self.render_cpu, "driver_cpu": self.driver_cpu,
            "prompt_tokens": self.prompt_tokens, "rss": self.rss,
            "wall_s": time.monotonic() - self._t0}))


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    config = json.loads(Path(os.environ["LONG_HORIZON_CONFIG"]).read_text())
    from thinkbatch.flows import cli
    from thinkbatch.tasks import runner
    from thinkbatch.tasks.rows import engine as engine_module

    def get_engine(spec: Any, parsers: Any, seeded: bool = False) -> ScriptedEngine:
        if "scripted" not in engine_module._ENGINES:  # close_engines() closes it at the end
            engine_module._ENGINES["scripted"] = ScriptedEngine(config)
        return engine_module._ENGINES["scripted"]

    runner.get_engine = get_engine
    return cli.main(argv[argv.index("thinkbatch.flows.cli") + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
