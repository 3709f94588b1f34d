"""Benchmark: how long a clean stop takes, from SIGTERM to exit, and where the time goes.

The work pools' termination grace (deployments/work-pools/) is set from this. A running
`thinkbatch run` gets SIGTERM a fixed time after its first request; until it exits, the
benchmark watches what the stop does, each from its own evidence: the commit of the rows
already generated (the run's trace, tasks/report/trace.py), the shard claims and the run lease
released (their files in the output), the engine's processes gone (`VLLM::` process
titles under the run), and the exit (code 75).

Three stops of the same job:
- `buffered`: flush thresholds out of reach, so every row generated before the signal is
  still buffered and the stop commits all of them at once (its largest commit);
- `flushed`: small flushes, so little is left to commit: the stop's fixed costs;
- `group`: as `buffered`, with SIGTERM to the whole process group, as `tini -g` (the
  image's init) passes a container stop on: the engine's processes get it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from context import HERE, Context
from harness import job_dict, write_job
from summary import Goal, row
from workloads import prompts

from thinkbatch.tasks.report import trace

STOPPED = "thinkbatch: stopped by SIGTERM"  # the CLI's line once the flow has ended
PREFECT_CANCEL_GRACE_S = 30  # Prefect 3.7: SIGTERM to the flow run's process, SIGKILL 30 s later
POLL_S = 0.02


def _engine_pids(pid: int) -> list[int]:
    """The engine's processes below the run: vLLM titles them `VLLM::EngineCore`,
    `VLLM::Worker_TP0`..."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "VLLM::" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _held(out: Path) -> bool:
    """Whether the run still holds its lease or any shard claim."""
    return (out / "_lease.json").exists() or any((out / "_claims").glob("*.json"))


def _stop(ctx: Context, job: Path, out: Path, after_s: float, group: bool,
          timeout_s: float = 900) -> dict[str, Any]:
    """Run the job, send SIGTERM `after_s` seconds after its first request, and time
    the stop's steps (seconds after the signal)."""
    path, log = job.with_suffix(".trace.jsonl"), job.with_suffix(".stderr")
    path.unlink(missing_ok=True)
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", trace.ENV: str(path)}
    cmd = [ctx.python, "-m", "thinkbatch.flows.cli", "run", str(job), "--no-progress",
           "--show-rows", "0"]
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True, cwd=HERE.parent)
    sent, first, engine = 0.0, None, []
    steps: dict[str, float | None] = {"released_s": None, "engine_gone_s": None,
                                      "reported_s": None}
    deadline = time.monotonic() + timeout_s
    try:
        for event in trace.follow(path, lambda: proc.poll() is None):
            if time.monotonic() > deadline:
                break
            if event["event"] == trace.SUBMITTED and first is None:
                first = event["time"]
            if first is not None and event["time"] - first >= after_s:
                engine = _engine_pids(proc.pid)
                (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
                sent = time.time()
                break
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.time() - sent
            if sent and steps["released_s"] is None and not _held(out):
                steps["released_s"] = now
            if sent and steps["engine_gone_s"] is None and all(map(_gone, engine)):
                steps["engine_gone_s"] = now
            if sent and steps["reported_s"] is None and STOPPED in log.read_text():
                steps["reported_s"] = now
            time.sleep(POLL_S)
        exit_s = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    tail = log.read_text()[-3000:]
    if not sent or proc.returncode != 75:
        raise RuntimeError(f"expected a stop with exit 75, got {proc.returncode} "
                           f"(signal sent: {bool(sent)}):\n{tail}")
    events = trace.read(path)
    finished = sum(e["event"] == trace.FINISHED and e["time"] < sent for e in events)
    commits = [e for e in events if e["event"] == trace.COMMITTED and e["time"] >= sent]
    committed_before = sum(e["rows"] for e in events
                           if e["event"] == trace.COMMITTED and e["time"] < sent)
    parts = [p for p in (out / "data").glob("*.parquet") if p.stat().st_mtime >= sent - 1]
    return {
        "signal": "SIGTERM to the process group" if group else "SIGTERM to the process",
        "exit_code": proc.returncode,
        "rows_finished_before_signal": finished,
        "rows_committed_before_signal": committed_before,
        "rows_committed_by_stop": sum(e["rows"] for e in commits),
        "bytes_committed_by_stop": sum(p.stat().st_size for p in parts),
        "commit_s": max((e["time"] - sent for e in commits), default=None),
        **steps,
        "exit_s": exit_s,
        "engine_processes": len(engine),
        "stderr_tail": tail[-600:],
    }


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.work / "clean_stop"
    n = ctx.size(4000, 1500)
    after_s = ctx.size(20, 8)
    inputs = prompts(d / "prompts.parquet", n)
    sampling = {"temperature": 0.0, "max_tokens": 64 if ctx.mini else 256, "ignore_eos": True}
    cases = {"buffered": (10**7, False), "flushed": (16, False), "group": (10**7, True)}
    stops = {}
    for name, (flush_rows, group) in cases.items():
        job = job_dict(ctx, inputs, d / f"{name}-out", sampling=sampling,
                       rows_per_shard=500, flush_rows=flush_rows)
        job["output"]["flush_seconds"] = 3600 if flush_rows > n else 60
        path = write_job(d / f"{name}.json", job)
        stops[name] = _stop(ctx, path, d / f"{name}-out", after_s, group)
    worst = max(s["exit_s"] for s in stops.values())
    b = stops["buffered"]
    mib = b["bytes_committed_by_stop"] / 2**20

    def steps(s: dict[str, Any]) -> str:
        return (f"commit {s['commit_s']:.2f} s, released {s['released_s']:.2f} s, "
                f"engine gone {s['engine_gone_s']:.2f} s, flow ended {s['reported_s']:.2f} s, "
                f"exit {s['exit_s']:.2f} s")

    summary = [row(f"{name}: SIGTERM -> exit ({s['signal']})", steps(s))
               for name, s in stops.items()]
    summary += [
        row("buffered: rows committed by the stop",
            f"{b['rows_committed_by_stop']} ({b['rows_finished_before_signal']} finished "
            f"before the signal), {mib:.2f} MiB of Parquet"),
        row("slowest stop, against Prefect's cancellation window",
            f"{worst:.1f} s", Goal(f"< {PREFECT_CANCEL_GRACE_S} s",
                                   worst < PREFECT_CANCEL_GRACE_S)),
    ]
    return {"settings": {"rows": n, "signal_after_first_submit_s": after_s,
                         "sampling": sampling, "cases": {k: {"flush_rows": v[0], "group": v[1]}
                                                         for k, v in cases.items()}},
            "figures": {"stops": stops, "worst_exit_s": worst},
            "summary": summary}
