"""The worker image's entrypoint (scripts/entrypoint.sh) as a container runs it: PID 1 of a
PID namespace of its own, stopped by SIGTERM from outside, as the kubelet or Docker stop a
container. A stand-in `prefect flow-run execute` starts a stand-in flow run, which starts
a stand-in engine process, as the real ones do; the flow run commits on SIGTERM.

The stop must reach the flow run alone (not the executor, which reports the run's end,
nor the engine, which the flow run shuts down itself), and the container must last until
the flow run has committed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "scripts" / "entrypoint.sh"

# Each stand-in notes in DIR what happened to it; the flow run "commits" on SIGTERM.
EXECUTE = """
import signal, subprocess, sys
from pathlib import Path
d = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (d / "executor-got-sigterm").touch())
flow = subprocess.Popen([sys.executable, str(d / "flow.py"), str(d)])
sys.exit(flow.wait())
"""
FLOW = """
import signal, subprocess, sys, time
from pathlib import Path
d = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
engine = subprocess.Popen([sys.executable, str(d / "engine.py"), str(d)])
(d / "running").touch()
while not stop:
    time.sleep(0.05)
time.sleep(1.0)  # the commit
(d / "committed").touch()
engine.kill()
engine.wait()
sys.exit(0)
"""
ENGINE = """
import signal, sys, time
from pathlib import Path
d = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (d / "engine-got-sigterm").touch())
while True:
    time.sleep(0.05)
"""


def _unshare() -> list[str]:
    """A PID namespace with its own /proc, as a container has (user namespace if not root)."""
    if not shutil.which("unshare") or not shutil.which("pkill"):
        pytest.skip("needs util-linux's unshare and procps' pkill")
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        cmd[1:1] = ["--user", "--map-root-user"]
    if subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine allows no PID namespace (unshare failed)")
    return cmd


def _container(tmp_path: Path, argv: list[str]) -> tuple[subprocess.Popen, psutil.Process]:
    """Start `argv` as PID 1 of a new PID namespace, with the stand-in `prefect` on PATH;
    returns the namespace's creator and its PID 1 (as seen from here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("execute.py", EXECUTE), ("flow.py", FLOW), ("engine.py", ENGINE)):
        (tmp_path / name).write_text(code)
    prefect = bin_dir / "prefect"
    prefect.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "execute.py"} {tmp_path}\n')
    prefect.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*_unshare(), *argv], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "running").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stand-ins did not start"
        time.sleep(0.05)
    [init] = psutil.Process(proc.pid).children()
    return proc, init


def _stop(proc: subprocess.Popen, init: psutil.Process, grace_s: float) -> bool:
    """SIGTERM to the container's PID 1, SIGKILL after `grace_s`; whether it ended in time."""
    os.kill(init.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()  # --kill-child: the whole namespace goes with it
        proc.wait()
        return False


def test_a_container_stop_reaches_the_flow_run_alone_and_waits_for_its_commit(
        tmp_path: Path) -> None:
    proc, init = _container(tmp_path, ["sh", str(ENTRYPOINT), "prefect", "flow-run", "execute"])
    assert _stop(proc, init, grace_s=30), "the container outlived the grace"
    assert proc.returncode == 0  # the executor's exit status, passed on
    assert (tmp_path / "committed").exists()
    assert not (tmp_path / "executor-got-sigterm").exists()
    assert not (tmp_path / "engine-got-sigterm").exists()


def test_without_the_entrypoint_the_executor_as_pid_1_sleeps_through_the_stop(
        tmp_path: Path) -> None:
    """Why the image needs it: PID 1 gets no signal it has no handler for (the stand-in
    executor has one, so this uses the real Python default: none)."""
    proc, init = _container(tmp_path, ["sh", "-c", f'exec {sys.executable} -c "'
                                       "import subprocess, sys; sys.exit(subprocess.call("
                                       f"[sys.executable, '{tmp_path / 'flow.py'}', "
                                       f"'{tmp_path}']))\""])
    assert not _stop(proc, init, grace_s=3)
    assert not (tmp_path / "committed").exists()
