"""Process set-up that must happen before vLLM is imported, and vLLM's log lines.

vLLM's own logging set-up (`logging.config.dictConfig`) flushes every existing
handler while holding the logging lock; inside a Prefect flow one of those is
Prefect's API log handler, which needs that lock too, so `LLM(...)` hangs forever.
We turn vLLM's set-up off and give its loggers a plain stderr handler ourselves.
Each entry point calls it first (the CLI's main, the two flows' bodies): vLLM is only
ever imported inside functions, so no import needs to come after it.

The engine's own processes (engine core, TP workers) start fresh and apply the logging
config the engine hands them; `engine_logging` hands them the same handler, so their
lines look like this process's. At the default level (`THINKBATCH_VLLM_LOG_LEVEL`,
WARNING) the handler passes vLLM's warnings and the few lines that say how a load goes
(weights, compile, KV cache size in tokens): a 600 GB model loads for minutes, and a
user should see it move, not every INFO line vLLM writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LEVEL_ENV = "THINKBATCH_VLLM_LOG_LEVEL"
_FORMAT = "%(levelname)s %(asctime)s [vllm] %(message)s"
# vLLM 0.32's messages (their templates) that report an engine load's steps and size.
LOAD_LINES = re.compile(
    r"Starting to load model|Checkpoint size|Loading weights took|Model loading took|"
    r"KV cache memory|KV cache size|torch\.compile took|Graph capturing finished|"
    r"init engine \(")


def _level() -> int:
    name = os.environ.get(LEVEL_ENV, "WARNING").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_ENV}={name!r} is not a logging level (e.g. INFO, WARNING)")
    return level


def _logger_level() -> int:
    """Low enough for the load lines, unless the user asked for less than warnings."""
    level = _level()
    return min(level, logging.INFO) if level <= logging.WARNING else level


class LoadLines(logging.Filter):
    """Records at the user's level, and at the default level the load lines too."""

    def __init__(self) -> None:
        super().__init__()
        self.level = _level()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return (record.levelno >= logging.INFO and self.level <= logging.WARNING
                and bool(LOAD_LINES.search(str(record.msg))))


def vllm_handler() -> logging.Handler:
    """The one handler of vLLM's loggers, in this process and in the engine's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    handler.addFilter(LoadLines())
    handler._thinkbatch = True  # type: ignore[attr-defined]
    return handler


def prepare_vllm_env() -> None:
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # batch jobs phone nowhere
    log = logging.getLogger("vllm")
    if not any(getattr(h, "_thinkbatch", False) for h in log.handlers):
        log.addHandler(vllm_handler())
        log.setLevel(_logger_level())
        log.propagate = False


@contextmanager
def engine_logging() -> Iterator[Any]:
    """vLLM's LoggingConfig for the engine's processes (`LLM(logging_config=...)`): a
    dictConfig naming `vllm_handler`, in a file that lives while the engine starts.

    vLLM applies the same config in this process first, unless it is the one already
    applied here (0.32's `configure_logging_if_needed`); it is marked so, since this
    process's handler is set (prepare_vllm_env) and a dictConfig here would hang in a
    flow (module docstring). Without that mark, nothing is handed on: the engine's
    processes keep Python's default (warnings only)."""
    import vllm.logger
    from vllm.config.logging import LoggingConfig

    if not hasattr(vllm.logger, "_last_configured_logging_config"):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="thinkbatch-vllm-logging-") as folder:
        path = Path(folder, "logging.json")
        path.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "handlers": {"thinkbatch": {"()": f"{__name__}.vllm_handler"}},
            "loggers": {"vllm": {"handlers": ["thinkbatch"], "level": _logger_level(),
                                 "propagate": False}}}))
        config = LoggingConfig(configure_logging=True, pylogging_config_file=str(path))
        vllm.logger._last_configured_logging_config = config
        yield config
