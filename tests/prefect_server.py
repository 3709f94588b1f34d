"""Starting a real Prefect API server on 127.0.0.1 for a test: waiting until it answers
(or failing fast when it died)."""

from __future__ import annotations

import subprocess
import time
import urllib.request


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
