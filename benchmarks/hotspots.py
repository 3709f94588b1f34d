"""Where the host path spends its time, from py-spy samples of the pipeline threads.

Only the pipeline's own threads count (feeder, driver, writer), so start-up (see the
startup benchmark) does not drown the per-row costs. A sample is charged to the
deepest thinkbatch frame on its stack and the call it was making there (e.g.
`OutputParser.parse -> DelegatingParser.parse`): that names both the pipeline step
and the library work behind it, which is what a fix would target.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from context import HERE

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
REPO = str(HERE.parent)
PIPELINE_THREADS = ("tasks/rows/pipeline.py", "tasks/store/commit.py")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.is_file() else shutil.which("py-spy")


def wrap(out: Path, rate: int = 100) -> list[str]:
    """A command prefix that samples the child into `out` (py-spy's raw format)."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    return [spy, "record", "--format", "raw", "--rate", str(rate), "--output", str(out),
            "--nonblocking", "--"]


PACKAGES = ("tasks/", "flows/", "schemas/")  # thinkbatch's folders; py-spy names them
# relative to the working directory (the repo root) or absolutely


def _ours(file: str) -> bool:
    rel = file[len(REPO) + 1:] if file.startswith(REPO + "/") else file
    return rel.startswith(PACKAGES)


def _file(frame: str) -> str:
    m = FRAME.match(frame)
    return m["file"] if m else ""


def _name(frame: str) -> tuple[str, str]:
    m = FRAME.match(frame)
    if not m:
        return frame, ""
    file = m["file"]
    short = file.removeprefix(REPO + "/").rsplit("site-packages/", 1)[-1]
    return m["func"], short


def hot_spots(raw: Path, top: int = 3) -> dict[str, object]:
    """Shares of the pipeline threads' samples (feeder, driver, writer: start-up and
    Prefect's own threads left out), by (deepest thinkbatch frame -> its callee)."""
    spots: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = everything = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        everything += n
        frames = stack.split(";")
        if not any(_file(f).endswith(PIPELINE_THREADS) for f in frames):
            continue
        total += n
        leaf_func, leaf_file = _name(frames[-1])
        leaves[f"{leaf_func} ({leaf_file})"] += n
        ours = [i for i, f in enumerate(frames) if _ours(_file(f))]
        if not ours:
            spots["(outside thinkbatch: interpreter, threads, libraries)"] += n
            continue
        i = ours[-1]
        func, file = _name(frames[i])
        callee = _name(frames[i + 1])[0] if i + 1 < len(frames) else "(self)"
        spots[f"{file}:{func} -> {callee}"] += n
    def share(c: Counter[str], k: int) -> list[dict[str, object]]:
        return [{"where": w, "samples": v, "share": v / max(total, 1)} for w, v in c.most_common(k)]

    return {"samples": total, "samples_all_threads": everything, "top": share(spots, top),
            "top_leaf_functions": share(leaves, top), "all": share(spots, 12)}
