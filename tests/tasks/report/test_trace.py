"""The THINKBATCH_TRACE file: whole lines from many writers, followed while it grows."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from thinkbatch.tasks.report import trace
from thinkbatch.tasks.report.trace import COMMITTED, SUBMITTED, Trace


def test_no_trace_unless_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(trace.ENV, raising=False)
    assert Trace.from_env() is None
    monkeypatch.setenv(trace.ENV, str(tmp_path / "t.jsonl"))
    Trace.from_env().record(COMMITTED, shard=3, rows=16)  # type: ignore[union-attr]
    [event] = trace.read(tmp_path / "t.jsonl")
    assert event["event"] == COMMITTED and (event["shard"], event["rows"]) == (3, 16)
    assert abs(event["time"] - time.time()) < 60 and event["pid"] > 0


def _write_rows(path: str, first: int, n: int) -> None:
    t = Trace(path)
    for row in range(first, first + n):
        t.record(SUBMITTED, shard=0, row=row, sample=0)


def test_processes_and_threads_append_whole_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "t.jsonl")
    procs = [multiprocessing.get_context("spawn").Process(target=_write_rows,
                                                          args=(path, i * 1000, 1000))
             for i in range(2)]
    threads = [threading.Thread(target=_write_rows, args=(path, 2000 + i * 1000, 1000))
               for i in range(2)]
    for w in (*procs, *threads):
        w.start()
    for w in (*procs, *threads):
        w.join()
    events = trace.read(path)
    assert sorted(e["row"] for e in events) == list(range(4000))
    assert len({e["pid"] for e in events}) == 3


def test_follow_sees_events_as_they_come_and_ends_with_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"  # not there yet: follow waits for it
    done = threading.Event()

    def writer() -> None:
        t = Trace(path)
        for row in range(5):
            t.record(SUBMITTED, shard=0, row=row, sample=0)
            time.sleep(0.01)
        with open(path, "ab") as f:
            f.write(b'{"event": "committed"')  # a line cut short: not an event yet
        done.set()

    threading.Thread(target=writer).start()
    seen = [e["row"] for e in trace.follow(path, lambda: not done.is_set())]
    assert seen == list(range(5))
