"""Reading the process table (/proc) in tests: which processes a run started, and which of
them are still alive (a zombie is dead; a reused pid has another start time)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state), or None once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[19], fields[0]


def tree(root: int) -> dict[int, str]:
    """{pid: start time} of every live process below `root`."""
    table = {int(p): st for p in os.listdir("/proc") if p.isdigit()
             if (st := _stat(int(p))) is not None and st[2] != "Z"}
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, started, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def alive(pid: int, started: str) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == started and st[2] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return "?"


def left_alive(started: dict[int, str], seconds: float, poll_s: float = 0.2) -> list[str]:
    """Command lines of the `started` processes still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := [cmdline(p) for p, s in started.items() if alive(p, s)]) and \
            time.monotonic() < deadline:
        time.sleep(poll_s)
    return left
