"""Running `thinkbatch run` and bare vLLM as subprocesses, and reading what they leave.

The real CLI as a subprocess measures what a user gets (imports, Prefect, planning,
storage), and `os.wait4` gives that one child's peak RSS. What it does when is read from
its trace (tasks/report/trace.py): each row submitted and each part committed, stamped by the
run itself as it happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from context import HERE, Context

from thinkbatch.tasks.report import trace


def job_dict(ctx: Context, inputs: Path, out: Path, *, engine: dict[str, Any] | None = None,
             sampling: dict[str, Any], rows_per_shard: int, flush_rows: int,
             input_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job like a user's: kimi_k2 parsers, checkpoint flushes, Parquet out."""
    return {
        "name": "bench",
        "input": {"path": str(inputs), "id_column": "id", "prompt_column": "prompt",
                  **(input_extra or {})},
        "shards": {"rows_per_shard": rows_per_shard},
        "engine": engine if engine is not None else {"kind": "vllm", **ctx.engine_section()},
        "sampling": sampling,
        "parsers": {"reasoning": "kimi_k2", "tool_call": "kimi_k2"},
        "output": {"path": str(out), "flush_rows": flush_rows, "flush_seconds": 60},
    }


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=1))  # JSON is YAML
    return path


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    peak_rss_mib: float
    stderr_tail: str
    first_submit_s: float | None = None  # since the command started
    submitted: set[int] = field(default_factory=set)
    commits: list[tuple[float, int]] = field(default_factory=list)  # (s, rows so far)
    killed: bool = False
    capped: bool = False  # killed when its measuring window closed

    def steady_rows_per_s(self) -> float | None:
        """Rows committed per second between the first and the last commit: the
        pipeline's pace with start-up and the final flush left out."""
        if len(self.commits) < 2:
            return None
        (t0, r0), (t1, r1) = self.commits[0], self.commits[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else None


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit code and peak RSS (MiB) of this one child, not of every child so far."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _expire(pgid: int, res: RunResult) -> None:
    _kill_group(pgid)
    res.stderr_tail += "\n[bench] killed: the run ran past its timeout"


def _running(proc: subprocess.Popen) -> bool:
    """Whether the child still runs, without reaping it: `_reap` needs it for wait4."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def run_cli(ctx: Context, job: Path, *, kill_after_commits: int = 0,
            pin_core: int | None = None, wrap: list[str] | None = None,
            window_s: float | None = None, kill_after_s: float | None = None,
            timeout_s: float = 900) -> RunResult:
    """`thinkbatch run JOB`; with `kill_after_commits`, SIGKILL its process group right
    after that many commits (how a node dies), as tests/conftest.py does; with
    `kill_after_s`, at the first event that many seconds after its first submit; with
    `window_s`, at the first commit that far after the first one (a measurement cut
    short so start-up cannot eat it, not an error)."""
    cmd = [ctx.python, "-m", "thinkbatch.flows.cli", "run", str(job), "--no-progress",
           "--show-rows", "0"]
    cmd = [*(wrap or []), *cmd]
    if pin_core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(pin_core), *cmd]
    path, log = job.with_suffix(".trace.jsonl"), job.with_suffix(".stderr")
    path.unlink(missing_ok=True)  # this run's events only
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", trace.ENV: str(path)}
    started, started_at = time.monotonic(), time.time()  # the trace's clock: Unix time
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True, cwd=HERE.parent)
    res = RunResult(returncode=0, wall_s=0.0, peak_rss_mib=0.0, stderr_tail="")
    cap = threading.Timer(timeout_s, _expire, (proc.pid, res))
    cap.start()
    try:
        for event in trace.follow(path, lambda: _running(proc)):
            at = event["time"] - started_at
            if event["event"] == trace.SUBMITTED:
                if res.first_submit_s is None:
                    res.first_submit_s = at
                res.submitted.add(event["row"])
            elif event["event"] == trace.COMMITTED:
                done = (res.commits[-1][1] if res.commits else 0) + event["rows"]
                res.commits.append((at, done))
                if len(res.commits) == kill_after_commits:
                    res.killed = True
                    break
                if window_s is not None and at - res.commits[0][0] >= window_s:
                    res.killed = res.capped = True
                    break
            if kill_after_s is not None and res.first_submit_s is not None \
                    and at - res.first_submit_s >= kill_after_s:
                res.killed = True
                break
    except BaseException:
        res.killed = True
        raise
    finally:
        cap.cancel()
        if res.killed:
            _kill_group(proc.pid)
        res.returncode, res.peak_rss_mib = _reap(proc)
        res.wall_s = time.monotonic() - started
        res.submitted.update(e["row"] for e in trace.read(path)
                             if e["event"] == trace.SUBMITTED)
        res.stderr_tail = log.read_text()[-4000:] + res.stderr_tail
    if not res.killed and res.returncode != 0:
        raise RuntimeError(f"thinkbatch run {job} exited {res.returncode}:\n{res.stderr_tail}")
    return res


def run_bare(ctx: Context, job: Path, out: Path, modes: list[str],
             timeout_s: float = 900) -> dict[str, Any]:
    """Bare vLLM (benchmarks/bare_vllm.py) over the same job's prompts and sampling."""
    cmd = [ctx.python, str(HERE / "bare_vllm.py"), str(job), str(out), *modes]
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parent)
    if r.returncode != 0:
        raise RuntimeError(f"bare vLLM exited {r.returncode}:\n{r.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - started
    return result


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "_manifest.json").read_text())


def output_columns(out: Path, columns: list[str]) -> dict[str, list[Any]]:
    return ds.dataset(out / "data", format="parquet").to_table(columns=columns).to_pydict()


def committed_row_indices(out: Path) -> set[int]:
    data = out / "data"
    if not data.is_dir() or not any(data.glob("*.parquet")):
        return set()
    return set(output_columns(out, ["row_index"])["row_index"])


def ttft_stats(values: list[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"ttft_mean_s": None, "ttft_median_s": None}
    return {"ttft_mean_s": statistics.fmean(xs), "ttft_median_s": statistics.median(xs)}


def thinkbatch_figures(out: Path, run: RunResult) -> dict[str, Any]:
    """The seed's figures (requests/s, output tok/s, TTFT) plus load and wall time: the
    manifest has all but TTFT, which is read from the data."""
    m = manifest(out)
    this = m["this_run"]
    return {
        "requests": this["rows_generated"],
        "output_tokens": this["output_tokens"],
        "generation_s": this["generation_s"],
        "requests_per_s": this["rows_per_s"],
        "output_tokens_per_s": this["output_tokens_per_s"],
        **ttft_stats(output_columns(out, ["ttft_s"])["ttft_s"]),
        "engine_load_s": this.get("engine_load_s"),
        "wall_s": run.wall_s,
        "peak_rss_mib": run.peak_rss_mib,
        "status_counts": m["status_counts"],
    }
