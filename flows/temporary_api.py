"""Prefect's temporary API server for `thinkbatch run`, in a session of its own.

With no PREFECT_API_URL, Prefect starts a temporary server the first time a flow needs
one, in the caller's process group. Ctrl-C signals every process of that group, so the
server died first, and a run that then stopped cleanly spent minutes retrying its last
state updates ("ConnectError: [Errno 111] Connection refused"). Started here in its own
session, it outlives the stop; Prefect stops it when the command exits (atexit), and
the guardian (tasks/process/guardian.py) kills it if thinkbatch itself is killed.

It gets at least STARTUP_S to answer, not Prefect's 20 s: with a fresh PREFECT_HOME it
first builds its database, which took longer than 20 s on a busy 2-core machine and
failed the run ("Timed out while attempting to connect to ephemeral Prefect API server").
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
                              PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                              get_current_settings)

STARTUP_S = 180


class _SessionServer(SubprocessASGIServer):
    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        """Prefect 3.7's command (prefect/server/api/server.py), in a new session."""
        return subprocess.Popen(
            args=[sys.executable, "-m", "uvicorn", "--app-dir",
                  str(prefect.__module_path__.parent), "--factory",
                  "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                  "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1",
                 **get_current_settings().to_environment_variables(exclude_unset=True)},
            start_new_session=True,
        )


def start_temporary_api() -> None:
    """Start now the temporary server Prefect would start later; Prefect's own code then
    uses this one (it keeps one instance per port: `SubprocessASGIServer()` returns it).
    Nothing to do when a server is configured."""
    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return
    _SessionServer().start(
        timeout=max(STARTUP_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
