"""Process set-up that must happen before vLLM is imported.

vLLM's own logging set-up (`logging.config.dictConfig`) flushes every existing
handler while holding the logging lock; inside a Prefect flow one of those is
Prefect's API log handler, which needs that lock too, so `LLM(...)` hangs forever.
We turn vLLM's set-up off and give its loggers a plain stderr handler ourselves.
Each entry point calls it first (the CLI's main, the two flows' bodies): vLLM is only
ever imported inside functions, so no import needs to come after it.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s [vllm] %(message)s"


def prepare_vllm_env() -> None:
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # batch jobs phone nowhere
    log = logging.getLogger("vllm")
    if not any(getattr(h, "_thinkbatch", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        handler._thinkbatch = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(os.environ.get("THINKBATCH_VLLM_LOG_LEVEL", "WARNING"))
        log.propagate = False
