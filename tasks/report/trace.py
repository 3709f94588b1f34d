"""An opt-in trace of a run's row events, one JSON object a line, for the tests and
benchmarks that must know when rows enter the engine and when parts are committed (to
kill a run at a chosen point, or to time it) without reading log lines as a protocol.

`THINKBATCH_TRACE=FILE` turns it on in every process that sees the variable: a
`thinkbatch run`, a deployment run, or a scale-out worker whose work pool passes it on.
Each event is one `write` to FILE opened with O_APPEND, so the lines of several threads
and processes never mix, and a SIGKILL loses no event already recorded. Events:

    {"event": "submitted", "time": T, "pid": P, "shard": S, "row": R, "sample": K}
        (a rollout's turn adds "turn": N, from 1)
    {"event": "finished", ...the same fields}  (the engine gave the request back)
    {"event": "committed", "time": T, "pid": P, "shard": S, "rows": N}

`time` is the Unix time in seconds, comparable across the processes of one machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from thinkbatch.tasks.rows.listeners import Listener

ENV = "THINKBATCH_TRACE"
SUBMITTED, FINISHED, COMMITTED = "submitted", "finished", "committed"
POLL_S = 0.02  # how often `follow` looks for new lines


class Trace(Listener):
    """The trace file, written as the pipeline tells its listeners (rows/listeners.py)."""

    def __init__(self, path: str | Path):
        self._file = open(path, "ab", buffering=0)  # O_APPEND; a write is one write(2)

    @classmethod
    def from_env(cls) -> Trace | None:
        """The trace THINKBATCH_TRACE asks for, or None: callers test it, so a run
        without one pays nothing per row."""
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def record(self, event: str, **fields: int) -> None:
        line = json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields})
        self._file.write((line + "\n").encode())

    def submitted(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        self.record(SUBMITTED, **_request(shard_id, row, sample, turn))

    def finished(self, shard_id: int, row: int, sample: int, turn: int | None) -> None:
        self.record(FINISHED, **_request(shard_id, row, sample, turn))

    def committed(self, shard_id: int, rows: int) -> None:
        self.record(COMMITTED, shard=shard_id, rows=rows)


def _request(shard_id: int, row: int, sample: int, turn: int | None) -> dict[str, int]:
    fields = {"shard": shard_id, "row": row, "sample": sample}
    return fields if turn is None else {**fields, "turn": turn}


def read(path: str | Path) -> list[dict[str, Any]]:
    """Every complete event in the file (none if there is no file yet)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def follow(path: str | Path, running: Callable[[], bool]) -> Iterator[dict[str, Any]]:
    """Events as they are appended, until `running()` is false and the file is read out."""
    offset, partial = 0, b""
    while True:
        alive = running()
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        *lines, partial = (partial + chunk).split(b"\n")
        yield from (json.loads(line) for line in lines)
        if not chunk:
            if not alive:
                return
            time.sleep(POLL_S)
