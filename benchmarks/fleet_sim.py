"""Benchmark: a 16-node fleet at Kimi-K2-Thinking's timings, simulated on this machine.

    python benchmarks/run.py --only fleet_sim            # 11-15 min on 2 busy cores
    FLEET_SIM_LABEL=after python benchmarks/run.py --only fleet_sim
    FLEET_SIM_SETTINGS='{"flush_sim_s": 3600}' FLEET_SIM_LABEL=... (a variant)

Each node is a process running the real worker flow (`shard_worker`, sim_worker.py)
against a real Prefect server and moto's S3 server, with a simulated engine
(sim_engine.py): heavy-tailed rows at the recipe's loaded decode rate, a 10-20 min load,
slots from the KV budget, and time scaled down (`Settings.sim_hour_s`). 100k rows in
1,000 shards; three nodes are SIGKILLed at random points and replaced, one is paused
(SIGSTOP) past its claim TTL and continued. The figures (fleet_figures.py) land in
results/fleet_sim.json under the run's label (FLEET_SIM_LABEL), beside the labels of
earlier runs, so a run before a change and one after it stay side by side.

What is scaled and what is not (the product's constants are real seconds):
- simulated: row decode, engine load, the pause; `flush_seconds` and `claim_ttl_s` are
  job fields, set to simulated durations the machine can keep up with (Settings);
- real: the worker loop's IDLE_POLL_S and STOP_CHECK_S, a lease's renewal at TTL/4 of
  the job's TTL, Prefect's own timers. An idle node's S3 requests are therefore counted
  per real minute, the rate S3 sees from an idle node of a real fleet.
All nodes share this host: a SIGKILLed node's claims are taken over at once (its pid
is gone, tasks/store/lease.py), which stands in for a fleet's 2-minute TTL (minutes against
rows of hours); the paused node keeps its pid, so its claims expire by the TTL.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUCKET = "fleet-sim"
LABEL_ENV = "FLEET_SIM_LABEL"
SETTINGS_ENV = "FLEET_SIM_SETTINGS"  # JSON: Settings fields over the defaults (a variant)


@dataclass
class Settings:
    rows: int = 100_000
    rows_per_shard: int = 100
    input_files: int = 10
    workers: int = 16
    kills: int = 3
    pause: bool = True
    sim_hour_s: float = 3.0  # wall seconds per simulated hour
    # 30 s wall: renewals every 7.5 s per claim. A node holds 10-25 claims (rows of hours
    # keep shards open), and renewing ~240 claims every 1.9 s (a 7.5 s TTL) swamped the
    # one moto process: a fleet with the default 120 s TTL renews every 30 s.
    claim_ttl_sim_s: float = 36_000.0
    pause_ttls: float = 1.5  # the paused node stays stopped at least this many claim TTLs,
    pause_max_ttls: float = 4.0  # and until another takes a claim over, at most this many
    flush_sim_s: float = 600.0  # the job's flush_seconds, simulated (0.5 s wall)
    step_real_s: float = 0.05  # the longest a simulated engine step blocks (vLLM: ~a step)
    chaos_window: tuple[float, float] = (0.1, 0.75)  # kills fall in this share of the run
    timeout_real_s: float = 1500.0
    seed: int = 24
    model: dict[str, Any] = field(default_factory=dict)  # SimModel fields over its defaults
    # The job's, over the preset's 32,768; None: the rows' size the simulated KV cache is
    # sized for (SimModel.tokens_per_row), as a user who knows their rows states it.
    expected_tokens_per_row: int | None = None

    @classmethod
    def quick(cls) -> Settings:
        return cls(rows=8_000, workers=4, kills=1, input_files=2, timeout_real_s=600.0)

    @property
    def scale(self) -> float:
        """Wall seconds per simulated second."""
        return self.sim_hour_s / 3600.0


def job_dict(s: Settings) -> dict[str, Any]:
    """A Kimi-K2-Thinking job as its preset makes it (max_in_flight, max_tokens, the
    engine layout), on S3, scaled out; replay rows so nothing imports vLLM: the
    simulated engine ignores the text and writes its own name as each row's answer. Its
    `expected_tokens_per_row` is the simulated rows' size (the preset's 32,768 capped the
    engines at 174 of their 228 slots), and with it the in-flight limit is the slots."""
    from sim_engine import SimModel

    from thinkbatch.schemas.job_file import resolve_raw

    return resolve_raw({
        "name": "fleet-sim",
        "input": {"path": f"s3://{BUCKET}/in/", "id_column": "id"},
        "shards": {"rows_per_shard": s.rows_per_shard},
        "engine": {"kind": "replay", "replay_column": "raw_text",
                   "expected_tokens_per_row": (s.expected_tokens_per_row
                                               or SimModel(**s.model).tokens_per_row)},
        "parsers": {"reasoning": None, "tool_call": None},
        "output": {"path": f"s3://{BUCKET}/out", "flush_seconds": s.flush_sim_s * s.scale},
        "scale": {"workers": s.workers, "claim_ttl_s": s.claim_ttl_sim_s * s.scale},
    }, preset="kimi-k2-thinking")


@dataclass
class Launch:
    """One node process: a worker index, started at `started` (simulated seconds)."""

    instance: str
    index: int
    listener: int
    proc: subprocess.Popen
    started: float
    ended: float | None = None
    rc: int | None = None
    fate: str = "running"  # done, killed, failed, timed out


class Fleet:
    def __init__(self, s: Settings, work: Path):
        from sim_engine import Lengths, SimModel

        self.s = s
        self.work = work
        self.model = SimModel(**s.model)
        self.lengths = Lengths(self.model, s.rows)
        self.rng = np.random.default_rng(s.seed)
        self.launches: list[Launch] = []
        self.chaos: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.servers: list[subprocess.Popen] = []
        for d in ("events", "ready", "logs", "prefect"):
            (work / d).mkdir(parents=True, exist_ok=True)
        self.trace = work / "trace.jsonl"
        self.go = work / "go"

    # -- set-up -------------------------------------------------------------------

    def _server(self, *args: str, log: str) -> subprocess.Popen:
        env = {**os.environ, "PREFECT_HOME": str(self.work / "prefect"),
               "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, str(HERE / "fleet_servers.py"), *args], env=env,
                                stdout=(self.work / "logs" / log).open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(proc)
        return proc

    def _start_servers(self) -> None:
        listeners = self.s.workers + self.s.kills + 8 + 1  # the last one is ours
        ready = self.work / "s3-ports.json"
        s3 = self._server("s3", str(listeners), str(ready), log="s3.log")
        self.prefect_port = _free_port()
        prefect = self._server("prefect", str(self.prefect_port), log="prefect.log")
        _wait(lambda: ready.exists() and ready.stat().st_size > 0, s3, "the S3 server")
        self.ports = json.loads(ready.read_text())
        self.prefect_url = f"http://127.0.0.1:{self.prefect_port}/api"
        _wait(lambda: _get(f"{self.prefect_url}/health") is not None, prefect,
              "the Prefect server", timeout_s=180)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.ports[-1]}")
        self.free_listeners = list(range(len(self.ports) - 1))

    def _write_input(self) -> None:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        per_file = -(-self.s.rows // self.s.input_files)
        for f in range(self.s.input_files):
            ids = range(f * per_file, min((f + 1) * per_file, self.s.rows))
            table = pa.table({"id": [f"q{i:06d}" for i in ids],
                              "prompt": [f"problem {i}: think it through" for i in ids],
                              "raw_text": ["-"] * len(ids)})
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=self.s.rows_per_shard)
            client.put_object(Bucket=BUCKET, Key=f"in/part-{f:03d}.parquet",
                              Body=sink.getvalue().to_pybytes())

    def _plan(self) -> Any:
        from thinkbatch.schemas.job_file import validate_job
        from thinkbatch.tasks.store import checkpoint
        from thinkbatch.tasks.store.layout import OutputLayout
        from thinkbatch.tasks.store.plan import make_plan
        from thinkbatch.tasks.store.storage import Storage

        self.job = job_dict(self.s)
        spec = validate_job(self.job)
        self.layout = OutputLayout(spec.output.path, Storage(spec.storage))
        plan, _ = checkpoint.open_plan(self.layout, make_plan(spec, self.layout.store))
        return plan

    # -- nodes --------------------------------------------------------------------

    def _launch(self, index: int) -> Launch | None:
        if not self.free_listeners:
            return None
        listener = self.free_listeners.pop(0)
        instance = f"w{index:02d}.{sum(x.index == index for x in self.launches)}"
        self.config["seeds"][instance] = len(self.launches)
        config = self.work / f"config-{instance}.json"
        config.write_text(json.dumps(self.config))
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.ports[listener]}",
               "PREFECT_API_URL": self.prefect_url, "PREFECT_HOME": str(self.work / "prefect"),
               "PREFECT_LOGGING_LEVEL": "WARNING", "THINKBATCH_TRACE": str(self.trace),
               "VLLM_CONFIGURE_LOGGING": "0"}
        proc = subprocess.Popen([sys.executable, str(HERE / "sim_worker.py"), str(config),
                                 str(index), instance], env=env, cwd=self.work,
                                stdout=(self.work / "logs" / f"{instance}.log").open("w"),
                                stderr=subprocess.STDOUT)
        launch = Launch(instance, index, listener, proc, self._now() if self.t0 else 0.0)
        self.launches.append(launch)
        return launch

    def _now(self) -> float:
        return (time.time() - self.t0) / self.s.scale

    def _unfinished(self) -> int:
        from thinkbatch.tasks.store import checkpoint

        return len(self.plan.shards) - len(checkpoint.done_shards(self.layout))

    def _schedule(self) -> list[tuple[float, str]]:
        """Kills at random points of the run's expected length, and the pause."""
        expected = (self.lengths.output.sum() * self.model.s_per_token
                    / (self.s.workers * self.model.slots) + np.mean(self.model.load_s))
        lo, hi = self.s.chaos_window
        events = [(float(t), "kill") for t in self.rng.uniform(lo, hi, self.s.kills) * expected]
        if self.s.pause:
            events.append((float(self.rng.uniform(0.25, 0.6) * expected), "pause"))
        self.expected_sim_s = float(expected)
        return sorted(events)

    def _victim(self, paused: Launch | None, holding: bool) -> Launch | None:
        """A random live node with its engine loaded (and, `holding`, claims held)."""
        live = [x for x in self.launches if x.fate == "running" and x is not paused
                and b'"e":"loaded"' in _read(self.work / "events" / f"{x.instance}.jsonl")]
        for i in self.rng.permutation(len(live)):
            if not holding or self._claims_of(live[i].proc.pid):
                return live[i]
        return None

    def _end(self, launch: Launch, fate: str) -> None:
        launch.rc = launch.proc.wait()  # reaped at once: a zombie's pid looks alive
        launch.ended, launch.fate = self._now(), fate

    def _drive(self) -> None:
        """Until every node has ended: kills, the pause, replacements for failed nodes."""
        schedule = self._schedule()
        paused: Launch | None = None
        stopped_at, held = 0.0, set()
        started = time.monotonic()
        while any(x.fate == "running" for x in self.launches):
            now = self._now()
            while schedule and schedule[0][0] <= now:
                _, kind = schedule.pop(0)
                victim = self._victim(paused, holding=kind == "pause")
                if victim is None:
                    continue
                if kind == "kill":
                    victim.proc.send_signal(signal.SIGKILL)
                    self._end(victim, "killed")
                    self.chaos.append({"kind": "kill", "t": now, "instance": victim.instance})
                    self._replace(victim, now)
                else:
                    victim.proc.send_signal(signal.SIGSTOP)
                    paused, stopped_at = victim, time.monotonic()
                    held = self._claims_of(victim.proc.pid)
                    self.chaos.append({"kind": "pause", "t": now, "instance": victim.instance,
                                       "claims_held": len(held)})
            if paused is not None and self._may_continue(stopped_at, held, paused.proc.pid):
                paused.proc.send_signal(signal.SIGCONT)
                self.chaos.append({"kind": "continue", "t": now, "instance": paused.instance,
                                   "claims_taken_over": sorted(self._taken(held, paused.proc.pid))})
                paused = None
            for launch in self.launches:
                if launch.fate == "running" and launch.proc.poll() is not None:
                    self._end(launch, "done" if launch.proc.returncode == 0 else "failed")
                    if launch.fate == "failed":
                        self.chaos.append({"kind": "failed", "t": now,
                                           "instance": launch.instance, "rc": launch.rc})
                        self._replace(launch, now)
            if time.monotonic() - started > self.s.timeout_real_s:
                for launch in self.launches:
                    if launch.fate == "running":
                        if launch is paused:
                            launch.proc.send_signal(signal.SIGCONT)
                        launch.proc.send_signal(signal.SIGKILL)
                        self._end(launch, "timed out")
                self.chaos.append({"kind": "timeout", "t": now})
                return
            time.sleep(0.1)

    def _claims_of(self, pid: int) -> set[str]:
        """The claims a node process holds now (the pid each claim names)."""
        store, root = self.layout.store, self.layout.claims
        return {name for name in store.list_files(root, ".json")
                if self._holder(name).get("pid") == pid}

    def _holder(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.layout.store.read_bytes(f"{self.layout.claims}/{name}"))
        except FileNotFoundError:
            return {}

    def _taken(self, held: set[str], pid: int) -> set[str]:
        return {name for name in held if self._holder(name).get("pid") != pid}

    def _may_continue(self, stopped_at: float, held: set[str], pid: int) -> bool:
        """Past `pause_ttls` claim TTLs, once another node took a claim of it over (a
        claim that expired is taken only when another node's claim order reaches it),
        or at `pause_max_ttls`."""
        ttls = (time.monotonic() - stopped_at) / (self.s.claim_ttl_sim_s * self.s.scale)
        if ttls < self.s.pause_ttls:
            return False
        if ttls >= self.s.pause_max_ttls:
            return True
        if time.monotonic() < getattr(self, "_next_look", 0.0):
            return False
        self._next_look = time.monotonic() + 1.0
        return bool(self._taken(held, pid))

    def _replace(self, lost: Launch, now: float) -> None:
        """A new node takes the lost one's place while shards remain, as a fleet's
        next round would."""
        if self._unfinished():
            new = self._launch(lost.index)
            self.chaos.append({"kind": "replacement", "t": now, "instance":
                               new.instance if new else None, "for": lost.instance})

    # -- the run ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        real_started = time.time()
        try:
            self._start_servers()
            self._write_input()
            self.plan = self._plan()
            self.config = {"job": self.job, "model": asdict(self.model), "rows": self.s.rows,
                           "scale": self.s.scale, "events": str(self.work / "events"),
                           "ready": str(self.work / "ready"), "go": str(self.go),
                           "step_real_s": self.s.step_real_s, "seeds": {}}
            for i in range(self.s.workers):
                self._launch(i)
            _wait(lambda: len(os.listdir(self.work / "ready")) == self.s.workers, None,
                  "the nodes to reach the start (sim_worker.Gate: their first claim)",
                  timeout_s=300)
            self.t0 = time.time() + 0.2
            (self.work / "go.tmp").write_text(repr(self.t0))
            os.replace(self.work / "go.tmp", self.go)
            self._drive()
            ended = self._now()
            s3_log = json.loads(_get(f"http://127.0.0.1:{self.ports[-1]}/__sim/log"))
            prefect = json.loads(_get(f"http://127.0.0.1:{self.prefect_port}/__sim/counts"))
            from fleet_figures import Records, figures

            records = Records.read(self, s3_log, prefect, ended)
            # The servers' records are gone once they stop: kept with the scratch folder
            # (--keep), the figures can be drawn again without running the fleet again.
            (self.work / "records.pickle").write_bytes(pickle.dumps(records))
            out = figures(records)
            out["wall_s"] = time.time() - real_started
            out["run_wall_s"] = ended * self.s.scale
            out["loadavg_at_end"] = os.getloadavg()
            return out
        finally:
            for launch in self.launches:
                if launch.proc.poll() is None:
                    launch.proc.send_signal(signal.SIGCONT)
                    launch.proc.kill()
                    launch.proc.wait()
            for proc in self.servers:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()
    except OSError:
        return None


def _wait(ready: Any, proc: subprocess.Popen | None, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _commit() -> dict[str, Any]:
    """The product code measured: its commit, and whether it differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "flows", "tasks", "schemas",
                            "deployments"], cwd=REPO, capture_output=True, text=True).stdout
    return {"commit": head, "product_code_changed_since": bool(dirty.strip())}


def run(ctx: Any) -> dict[str, Any]:
    from fleet_figures import chart, summary_rows
    from summary import RESULTS

    import resource

    s = replace(Settings.quick() if ctx.quick else Settings(),
                **json.loads(os.environ.get(SETTINGS_ENV) or "{}"))
    label = os.environ.get(LABEL_ENV, "latest")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {**Fleet(s, ctx.work / "fleet_sim").run(), **_commit(),
              "settings": {**asdict(s), "scale_wall_s_per_sim_s": s.scale}}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s_of_nodes_and_servers"] = (after.ru_utime + after.ru_stime
                                            - before.ru_utime - before.ru_stime)
    previous = RESULTS / "fleet_sim.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    runs[label] = result
    chart(result, RESULTS / f"fleet_sim_{label}.png")
    return {"label": label, "runs": runs, "summary": summary_rows(runs),
            "notes": NOTES}


NOTES = [
    "one process per simulated node runs the real `shard_worker` flow (claims, leases, "
    "pipeline, commits, Prefect task runs) with a simulated engine in place of vLLM "
    "(benchmarks/sim_engine.py); the job is the kimi-k2-thinking preset's as replay rows, "
    "so nothing loads vLLM or parses Kimi's format",
    "time: simulated seconds; wall figures (S3 per idle minute) are real minutes, as the "
    "loop's IDLE_POLL_S is; see `settings` for the scale, the TTL and flush interval",
    "a SIGKILLed node's claims are taken over at once (same host, pid gone); the paused "
    "node's expire by the claim TTL",
]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="the fleet simulation without run.py (results/ "
                                "untouched but for the chart)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the run's figures here (JSON)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args()
    from context import Context

    work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    ctx = Context(model="", engine={}, mini=False, quick=args.quick, work=work)
    result = run(ctx)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1))
    if args.keep:
        print(f"scratch kept in {work}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
