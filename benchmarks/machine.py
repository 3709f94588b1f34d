"""Where a figure was measured: CPU, cores, RAM, versions, preloaded allocators.

Figures without this context cannot be compared across machines or reruns.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
REEXEC_MARK = "THINKBATCH_BENCH_PRELOADED"


def preload_libs() -> list[str]:
    """tcmalloc and Intel OpenMP, as vLLM's CPU guide recommends; only those present."""
    libs = [next((p for p in TCMALLOC_CANDIDATES if Path(p).is_file()), None)]
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    libs.append(str(iomp) if iomp.is_file() else None)
    return [p for p in libs if p]


def reexec_with_preload() -> None:
    """Restart this interpreter once with LD_PRELOAD set; children inherit it."""
    if os.environ.get(REEXEC_MARK):
        return
    libs = [p for p in preload_libs() if p not in os.environ.get("LD_PRELOAD", "")]
    env = {**os.environ, REEXEC_MARK: "1"}
    if libs:
        env["LD_PRELOAD"] = ":".join([*libs, *filter(None, [os.environ.get("LD_PRELOAD")])])
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    os.environ[REEXEC_MARK] = "1"


def preloaded() -> dict[str, object]:
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    return {"ld_preload": current,
            "tcmalloc": any("tcmalloc" in p for p in current),
            "iomp5": any("libiomp5" in p for p in current)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: a CPU machine
        pass
    return []


def machine() -> dict[str, object]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": _ram_gib(),
        "gpus": _gpus(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def versions() -> dict[str, str | None]:
    from thinkbatch.tasks.report.manifest import versions as tb_versions

    return tb_versions()
