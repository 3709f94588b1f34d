"""The guardian (tasks/process/guardian.py) with real processes: a SIGKILLed owner's whole tree
dies, a grandchild in a session of its own included, and the guardian with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.processes import cmdline, left_alive, tree

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from thinkbatch.tasks.process import guardian
    guardian.start()
    subprocess.Popen(["sleep", "300"])
    subprocess.Popen(["bash", "-c", "setsid sleep 301 & exec sleep 302"])
    print("started", flush=True)
    time.sleep(float(sys.argv[1]))
""")


def _owner(lifetime: float) -> tuple[subprocess.Popen, dict[int, str]]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(lifetime)],
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 10
    while len(started := tree(owner.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # two polls: the guardian has seen all of them
    return owner, started


def test_a_sigkilled_owner_takes_its_whole_tree_with_it() -> None:
    owner, started = _owner(300)
    names = [cmdline(p) for p in started]
    assert any("guardian" in c for c in names) and any("sleep 301" in c for c in names), names
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert not left_alive(started, 5)


def test_an_owner_that_exits_leaves_nothing_behind_either() -> None:
    owner, started = _owner(4)
    assert owner.poll() is None, "the owner ended before its tree was recorded"
    owner.wait()
    assert not left_alive(started, 5)  # its children too: nothing stops them otherwise
