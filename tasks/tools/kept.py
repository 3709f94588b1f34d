"""The toolbox the job's checks open, kept for the run of the same job in this process, so
that each MCP server starts once per run, not once for the checks and again for the run.

The checks `keep` it (checking the job again finds it kept); the run `take`s it, and then
it is the run's to close. One toolbox is kept at a time; one never taken (a refused
resume, `thinkbatch validate`) is closed at exit.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path

from thinkbatch.schemas.rollout import RolloutSpec
from thinkbatch.tasks.tools.toolbox import Toolbox


class _Kept:
    """The one toolbox the checks opened and the run has not taken yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._box: Toolbox | None = None

    @staticmethod
    def _of(spec: RolloutSpec, base_dir: Path) -> str:
        """The job's tools as given (secrets too: kept in memory only) and where."""
        return f"{base_dir.resolve()}\n{spec.model_dump()!r}"

    def get(self, spec: RolloutSpec, base_dir: Path, take: bool = False) -> Toolbox | None:
        with self._lock:
            box = self._box
            if box is None or box.closed or self._key != self._of(spec, base_dir):
                return None
            if take:
                self._key, self._box = None, None
            return box

    def put(self, spec: RolloutSpec, base_dir: Path, box: Toolbox) -> Toolbox:
        with self._lock:
            old, self._key, self._box = self._box, self._of(spec, base_dir), box
        if old is not None:
            old.close()
        return box

    def close(self) -> None:
        with self._lock:
            box, self._key, self._box = self._box, None, None
        if box is not None:
            box.close()


_KEPT = _Kept()
atexit.register(_KEPT.close)


def keep(spec: RolloutSpec, base_dir: Path) -> Toolbox:
    """`Toolbox.open` for the job's checks, the toolbox then kept for the run (`take`)."""
    return _KEPT.get(spec, base_dir) or _KEPT.put(spec, base_dir, Toolbox.open(spec, base_dir))


def take(spec: RolloutSpec, base_dir: Path) -> Toolbox:
    """The toolbox `keep` holds for this job, now the caller's to close; else a new one."""
    return _KEPT.get(spec, base_dir, take=True) or Toolbox.open(spec, base_dir)
