"""A guardian process: when the process that owns an engine dies, by any signal, what it
started dies with it.

vLLM runs its engine core and each tensor-parallel worker in processes of their own, the
CLI starts Prefect's temporary API server, and multiprocessing a resource tracker; none of
them watches its parent. A parent killed with SIGKILL (a `kill -9`, the OOM killer,
Prefect's cancellation after its grace period) leaves them running, holding the GPUs.

`start()` launches this file as a tiny separate process (stdlib only, `python -I -S`, so it
is up in milliseconds), in a session of its own so that a signal to the owner's process
group does not reach it. Every POLL_S it reads /proc: while the owner lives it records the
owner's descendants (pid and start time, so a reused pid is never killed); once the owner
is gone it SIGKILLs every recorded descendant still alive, and any child those have, then
exits. A clean exit leaves nothing to kill, so it simply exits too.

Why not PR_SET_PDEATHSIG: it has to be set inside each child, between fork and exec, and
vLLM creates those processes; it fires when the creating thread ends rather than the
process; and it covers one generation only (an engine core's TP workers would survive).
Watching from outside needs no change to vLLM or Prefect and covers the whole tree.
Linux only (/proc); elsewhere `start()` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
KILL_ROUNDS = 5  # a dying tree may still fork: kill, look again, a few times

_started_for: int | None = None  # the pid this process started a guardian for


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks since boot, state) of a process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[1]), int(fields[19]), fields[0]


def processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every live (not zombie) process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None and st[2] not in "ZX":
            table[int(name)] = st[0], st[1]
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """{pid: start time} of every process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return st[1] if st else None


def watch(owner: int, owner_start: int) -> None:
    me = os.getpid()
    recorded: dict[int, int] = {}
    while True:
        table = processes()
        if table.get(owner, (0, None))[1] != owner_start:
            break
        recorded = {p: s for p, s in recorded.items() if table.get(p, (0, None))[1] == s}
        recorded.update(descendants({owner}, table))
        recorded.pop(me, None)
        time.sleep(POLL_S)
    for _ in range(KILL_ROUNDS):
        table = processes()
        alive = {p for p, s in recorded.items() if table.get(p, (0, None))[1] == s}
        targets = {**{p: recorded[p] for p in alive}, **descendants(alive, table)}
        targets.pop(me, None)
        if not targets:
            return
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        recorded = targets
        time.sleep(0.1)


def start() -> None:
    """Guard this process: once per process (a forked child starts its own if it calls
    this). Call it before starting anything that must not outlive this process."""
    global _started_for
    pid = os.getpid()
    if _started_for == pid or not os.path.isdir("/proc") or (own := start_time(pid)) is None:
        return
    subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(pid), str(own)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    _started_for = pid


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), int(sys.argv[2]))
