"""A real Prefect API server on 127.0.0.1 for a test module or session, with a
PREFECT_HOME of its own: started, waited for until it answers (or failed fast when it
died), and stopped with whatever its tests started against it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import prefect

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT = [str(Path(sys.executable).parent / "prefect")]
REQUEST = re.compile(r'uvicorn\.access - \S+ - "(\w+) (\S+) HTTP')
# For a server that runs deployments from deployments/prefect.yaml on process workers.
DEPLOYING = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
             "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "WARNING",
             "THINKBATCH_HOME": str(REPO)}


def wait_until_up(api_url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until `api_url`/health answers; RuntimeError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{api_url}/health", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("prefect server did not start") from None
            time.sleep(0.5)


class PrefectServer:
    """`prefect server start`, or with `access_log` the same app under uvicorn with its
    access log in HOME/access.log (`requests`). `env` (which the server and every
    `prefect` command or worker started here get) points at the server."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, access_log: bool = False):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, **(env or {}), "PREFECT_HOME": str(home),
                    "PREFECT_API_URL": self.url, "PREFECT_UI_ENABLED": "false",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.log = home / "access.log"
        self.workers: dict[str, subprocess.Popen] = {}
        if access_log:
            args = [sys.executable, "-m", "uvicorn", "--app-dir",
                    str(Path(prefect.__file__).parents[1]), "--factory",
                    "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                    str(port), "--log-level", "info", "--access-log"]
            out: Any = self.log.open("w")
            server_env = {**self.env, "PREFECT_SERVER_LOGGING_LEVEL": "INFO",
                          "PREFECT_LOGGING_LEVEL": "INFO"}
        else:
            args = [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            out, server_env = subprocess.DEVNULL, self.env
        self.proc = subprocess.Popen(args, env=server_env, cwd=REPO, stdout=out,
                                     stderr=subprocess.STDOUT if access_log else subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until_up(self.url, self.proc)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the access log holds so far (`access_log`)."""
        return REQUEST.findall(self.log.read_text())

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.url)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*PREFECT, *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    def start_worker(self, name: str, pool: str) -> None:
        self.workers[name] = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
            env=self.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def kill_worker(self, name: str) -> None:
        os.killpg(self.workers.pop(name).pid, signal.SIGKILL)

    def stop(self) -> None:
        for name in list(self.workers):
            self.kill_worker(name)
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
