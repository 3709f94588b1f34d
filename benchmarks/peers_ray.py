"""Side by side with Ray Data LLM, the peer a user would pick instead: same machine,
model, engine arguments, SamplingParams and rows, in one benchmark run.

- Throughput on the efficiency workload (fixed lengths) and the heavy-tailed one:
  output tok/s of `thinkbatch run` and of Ray Data LLM (`build_processor` with
  `vLLMEngineProcessorConfig`, benchmarks/ray_llm.py), Ray's `batch_size` and
  `max_concurrent_batches` at their defaults and at the best setting of the sweep
  (`--only peers_ray_sweep`). Load excluded: first request in the engine to the last
  output durably written (thinkbatch: its trace; Ray: the rows' arrival times and the
  written files' times); included: the command's whole wall time.
- Resume: each side killed (SIGKILL of its process group) halfway through its own
  uninterrupted generation time on the efficiency rows, then run again: rows on disk
  at the kill, rows the rerun generated, and the time the kill cost. Ray resumes through
  Ray Data's checkpointing by the id column, as its docs set it up, with blocks and files
  of thinkbatch's commit size (see _resume); thinkbatch as it is.
- What each gives the user: the columns each writes for the same Kimi-format
  completions (the random-miniature regex), and what a null prompt and a prompt longer
  than max_model_len do to each.

Ray is not a dependency of the product: `make bench-peers` installs it into
.bench-peers/ (git-ignored), and only Ray's driver gets that folder on its PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from context import HERE, Context
from harness import (
    RunResult,
    committed_row_indices,
    job_dict,
    manifest,
    output_columns,
    run_cli,
    write_job,
)
from summary import Goal, row
from thinkbatch.tasks.report import trace
from workloads import prompts

PEERS = Path(os.environ.get("THINKBATCH_BENCH_PEERS", HERE.parent / ".bench-peers"))
MARK = "THINKBATCH_BENCH_PEER"  # in every process a run starts: leftovers are found by it
READY = "Max pending requests is set to"  # Ray's engine actor, once its vLLM is up
RAY_DEFAULTS = {"batch_size": 32, "max_concurrent_batches": 8}  # vLLMEngineProcessorConfig
# The best of the sweep (results/peers_ray_sweep.json, 256 heavy-tailed rows): 866
# output tok/s against 690 at the defaults; 16 x 16 and 8 x 16 did worse (524, 497).
RAY_BEST = {"batch_size": 128, "max_concurrent_batches": 2}
SWEEP = [RAY_DEFAULTS, {"batch_size": 16, "max_concurrent_batches": 16},
         {"batch_size": 64, "max_concurrent_batches": 4},
         {"batch_size": 128, "max_concurrent_batches": 2},
         {"batch_size": 8, "max_concurrent_batches": 16}]
FLUSH_ROWS = 32  # thinkbatch commits as often as Ray's default batch completes
REGEX_SAMPLING = {"temperature": 0.8, "max_tokens": 256, "seed": 7}  # demo-random's


@dataclass
class RayRun:
    wall_s: float
    returncode: int
    killed: bool
    result: dict[str, Any] | None  # the driver's, when it got to the end
    log: Path
    ready_s: float | None  # when the engine actor reported its vLLM up


def _require_ray() -> None:
    if not (PEERS / "ray").is_dir():
        raise RuntimeError(f"Ray is not installed in {PEERS}: run `make bench-peers`")


def _leftovers(token: str) -> list[int]:
    """Processes still carrying this run's mark (Ray's raylet, workers, vLLM's engine
    core): killed by id after a run, so none keeps a core busy under the next one."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if f"{MARK}={token}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _reap_leftovers(token: str) -> int:
    pids = _leftovers(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def run_ray(ctx: Context, name: str, job: Path, out: Path, *, knobs: dict[str, int],
            postprocess: str = "kimi", checkpoint: Path | None = None,
            continue_on_error: bool = False, min_rows_per_file: int | None = None,
            rows_per_block: int | None = None, kill_after_ready_s: float | None = None,
            timeout_s: float = 600) -> RayRun:
    """benchmarks/ray_llm.py as its own process (a user's driver script); with
    `kill_after_ready_s`, SIGKILL its process group that long after the engine is up."""
    _require_ray()
    d = out.parent
    spec = {"job": str(job), "out": str(out), "postprocess": postprocess,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "continue_on_error": continue_on_error, "min_rows_per_file": min_rows_per_file,
            "rows_per_block": rows_per_block,
            "ray_temp_dir": str(ctx.work / "ray"),
            **knobs}
    spec_path, result_path = d / f"{name}.ray.json", d / f"{name}.ray-result.json"
    log = d / f"{name}.ray.stderr"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    token = f"{os.getpid()}-{name}-{time.monotonic_ns()}"
    env = {**os.environ, MARK: token, "PYTHONPATH": str(PEERS),
           "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    with log.open("w") as stderr:
        proc = subprocess.Popen([ctx.python, str(HERE / "ray_llm.py"), str(spec_path),
                                 str(result_path)], env=env, stdout=stderr, stderr=stderr,
                                start_new_session=True, cwd=HERE.parent)
    ready_s, killed = None, False
    try:
        while proc.poll() is None:
            now = time.monotonic() - started
            if ready_s is None and READY in log.read_text(errors="replace"):
                ready_s = now
            if kill_after_ready_s is not None and ready_s is not None \
                    and now - ready_s >= kill_after_ready_s:
                killed = True
                break
            if now > timeout_s:
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wall = time.monotonic() - started
        _reap_leftovers(token)
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result is None and not killed:
        raise RuntimeError(f"Ray driver {name} exited {proc.returncode}:\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    return RayRun(wall_s=wall, returncode=proc.returncode, killed=killed, result=result,
                  log=log, ready_s=ready_s)


def _data_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.parquet")) if out.is_dir() else []


def ray_figures(out: Path, run: RayRun) -> dict[str, Any]:
    """Output tok/s with load excluded: the first request's arrival in the engine (the
    rows' own `metrics.arrival_time`) to the last output file written; and the engine's
    own busy span (first queued to last token, the engine core's clock)."""
    files = _data_files(out)
    t = ds.dataset(files, format="parquet").to_table(columns=["completion_tokens", "metrics"])
    metrics = [m for m in t.column("metrics").to_pylist() if m]
    first = min(m["arrival_time"] for m in metrics)
    last = max(f.stat().st_mtime for f in files)
    tokens = sum(x or 0 for x in t.column("completion_tokens").to_pylist())
    engine = max(m["last_token_ts"] for m in metrics) - min(m["queued_ts"] for m in metrics)
    return {"rows": t.num_rows, "output_tokens": tokens, "generation_s": last - first,
            "output_tokens_per_s": tokens / (last - first), "engine_span_s": engine,
            "wall_s": run.wall_s, "engine_up_s": run.ready_s, "files": len(files),
            "knobs": run.result["config"]}


def tb_figures(out: Path, job: Path, run: RunResult) -> dict[str, Any]:
    """The same window for thinkbatch: its first submit to its last commit, and the
    engine's span, first submit to last request back (its trace)."""
    this = manifest(out)["this_run"]
    gen = run.commits[-1][0] - run.first_submit_s
    events = trace.read(job.with_suffix(".trace.jsonl"))
    engine = (max(e["time"] for e in events if e["event"] == trace.FINISHED)
              - min(e["time"] for e in events if e["event"] == trace.SUBMITTED))
    return {"rows": this["rows_generated"], "output_tokens": this["output_tokens"],
            "generation_s": gen, "output_tokens_per_s": this["output_tokens"] / gen,
            "engine_span_s": engine,
            "manifest_output_tokens_per_s": this["output_tokens_per_s"],
            "wall_s": run.wall_s, "engine_load_s": this.get("engine_load_s"),
            "first_submit_s": run.first_submit_s}


def _throughput(ctx: Context, name: str, inputs: Path, sampling: dict[str, Any], *,
                input_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    d = ctx.work / name
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=128, flush_rows=FLUSH_ROWS,
                                             input_extra=input_extra))
    load = {"before": os.getloadavg()}
    tb_run = run_cli(ctx, job)
    tb = tb_figures(d / "out", job, tb_run)
    tb["engine_log"] = _engine_notes(job.with_suffix(".stderr"))
    load["after_thinkbatch"] = os.getloadavg()
    sides: dict[str, Any] = {"thinkbatch": tb}
    for label, knobs in (("ray_defaults", RAY_DEFAULTS), ("ray_best", RAY_BEST)):
        out = d / label
        run = run_ray(ctx, label, job, out, knobs=knobs)
        sides[label] = {**ray_figures(out, run), "engine_log": _engine_notes(run.log)}
        load[f"after_{label}"] = os.getloadavg()
    for label in ("ray_defaults", "ray_best"):
        r = sides[label]
        sides[f"thinkbatch_over_{label}"] = {
            "load_excluded": tb["output_tokens_per_s"] / r["output_tokens_per_s"],
            "load_included": r["wall_s"] / tb["wall_s"],
            "same_output_tokens": r["output_tokens"] == tb["output_tokens"]}
    sides["load_avg"] = load
    return sides


def _engine_notes(log: Path) -> dict[str, bool]:
    """What the engine said about its set-up (the same on both sides, or the figures
    would not compare): whether vLLM found Intel OpenMP and tcmalloc preloaded."""
    text = log.read_text(errors="replace")
    return {"iomp5_missing": "libiomp is not found" in text,
            "tcmalloc_missing": "libtcmalloc is not found" in text}


def _committed_ids(checkpoint: Path) -> int:
    files = [p for p in checkpoint.glob("*.parquet") if not p.name.endswith(".pending.parquet")]
    return sum(pq.read_metadata(p).num_rows for p in files)


def _resume(ctx: Context, inputs: Path, sampling: dict[str, Any],
            uninterrupted: dict[str, Any]) -> dict[str, Any]:
    """Each side killed halfway through its own uninterrupted generation time, then
    rerun to the end."""
    d = ctx.work / "resume"
    n = pq.read_metadata(inputs).num_rows
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=128, flush_rows=FLUSH_ROWS))
    tb_ref, ray_ref = uninterrupted["thinkbatch"], uninterrupted["ray_defaults"]

    half = tb_ref["generation_s"] / 2
    killed = run_cli(ctx, job, kill_after_s=half)
    on_disk = committed_row_indices(d / "out")
    again = run_cli(ctx, job)
    ids = output_columns(d / "out", ["row_index"])["row_index"]
    tb = {"killed_after_s": half, "killed": killed.killed,
          "rows_on_disk_at_kill": len(on_disk),
          "rows_rerun_generated": manifest(d / "out")["this_run"]["rows_generated"],
          "rows_started_before_kill_and_redone":
              len((killed.submitted - on_disk) & again.submitted),
          "wall_killed_s": killed.wall_s, "wall_rerun_s": again.wall_s,
          "time_lost_s": killed.wall_s + again.wall_s - tb_ref["wall_s"],
          "rows_in_output": len(ids), "distinct": len(set(ids))}

    out, ckpt = d / "ray_out", d / "ray_checkpoint"
    # As set up by default, Ray hands the engine a whole input block (here the one input
    # file) as one task, whose rows come out together at its end: one output file, so a
    # kill before the end saves nothing (the throughput runs' `files`). Blocks of one
    # batch and files of at least FLUSH_ROWS rows give it thinkbatch's commit
    # granularity: Ray at its best here.
    same = {"knobs": RAY_DEFAULTS, "checkpoint": ckpt, "min_rows_per_file": FLUSH_ROWS,
            "rows_per_block": RAY_DEFAULTS["batch_size"]}
    rk = run_ray(ctx, "resume_killed", job, out, **same,
                 kill_after_ready_s=ray_ref["generation_s"] / 2)
    ray_saved = _committed_ids(ckpt)
    rr = run_ray(ctx, "resume_rerun", job, out, **same)
    ray_ids = ds.dataset(_data_files(out), format="parquet").to_table(
        columns=["id"]).column("id").to_pylist()
    ray = {"killed_after_s": ray_ref["generation_s"] / 2, "killed": rk.killed,
           "engine_up_before_kill": rk.ready_s is not None,
           "rows_on_disk_at_kill": ray_saved,
           "rows_rerun_generated": n - ray_saved,
           "wall_killed_s": rk.wall_s, "wall_rerun_s": rr.wall_s,
           "time_lost_s": rk.wall_s + rr.wall_s - ray_ref["wall_s"],
           "rows_in_output": len(ray_ids), "distinct": len(set(ray_ids)),
           "checkpoint_left": any(ckpt.iterdir()) if ckpt.is_dir() else False}
    return {"rows": n, "thinkbatch": tb, "ray_defaults_checkpointed": ray}


def _bad_rows_inputs(path: Path, good: int) -> Path:
    ids = [f"q{i:07d}" for i in range(good + 2)]
    texts: list[str | None] = [f"question {i}: what is the weather in city {i % 97}?"
                               for i in range(good)]
    texts += [None, "weather " * 3000]  # a null prompt; one longer than max_model_len
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": pa.array(texts, pa.string())}), path)
    return path


def _user(ctx: Context) -> dict[str, Any]:
    """The same Kimi-format rows through both, with one null and one too-long prompt."""
    from thinkbatch.schemas.job_file import resolve_raw

    good = ctx.size(16, 8)
    d = ctx.work / "user"
    inputs = _bad_rows_inputs(d / "prompts.parquet", good)
    regex = resolve_raw({}, preset="random-miniature")["sampling"]["structured_outputs"]
    sampling = {**REGEX_SAMPLING, "structured_outputs": regex}
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=128, flush_rows=FLUSH_ROWS))
    bad = [f"q{good:07d}", f"q{good + 1:07d}"]  # the null prompt, the too-long one
    run_cli(ctx, job)
    tb_t = ds.dataset(d / "out" / "data", format="parquet").to_table()
    tb_rows = {r["id"]: r for r in tb_t.to_pylist()}
    fail = run_ray(ctx, "user_defaults", job, d / "ray_defaults", knobs=RAY_DEFAULTS)
    cont = run_ray(ctx, "user_continue", job, d / "ray_continue", knobs=RAY_DEFAULTS,
                   continue_on_error=True, postprocess="kimi+raw")
    result: dict[str, Any] = {
        "rows": good + 2,
        "thinkbatch": {"columns": tb_t.column_names,
                       "statuses": {i: tb_rows[i]["status"] for i in sorted(tb_rows)},
                       "errors": {i: tb_rows[i]["error"] for i in sorted(tb_rows)
                                  if tb_rows[i]["error"]}},
        "ray_defaults": _ray_user(d / "ray_defaults", fail, bad),
        "ray_continue_on_error": _ray_user(d / "ray_continue", cont, bad),
    }
    ray_rows = {r["id"]: r for r in _ray_rows(d / "ray_continue")}
    result["same_parse_as_thinkbatch"] = _agreement(tb_rows, ray_rows, good)
    return result


def _ray_rows(out: Path) -> list[dict[str, Any]]:
    files = _data_files(out)
    return ds.dataset(files, format="parquet").to_table().to_pylist() if files else []


def _ray_user(out: Path, run: RayRun, bad: list[str]) -> dict[str, Any]:
    rows = _ray_rows(out)
    return {"error": (run.result or {}).get("error"), "rows_written": len(rows),
            "columns": sorted({k for r in rows for k in r}),
            "bad_rows": {r["id"]: {k: r.get(k) for k in (
                "__inference_error__", "reasoning", "answer", "tool_calls",
                "completion_tokens", "generated_text") if k in r}
                for r in rows if r["id"] in bad}}


def _agreement(tb: dict[str, dict], ray: dict[str, dict], good: int) -> dict[str, int]:
    same = {"reasoning": 0, "answer": 0, "tool_calls": 0, "rows": 0}
    for i in (f"q{k:07d}" for k in range(good)):
        if i not in ray:
            continue
        a, b = tb[i], ray[i]
        tb_calls = [(c["name"], c["arguments"]) for c in a["tool_calls"] or []]
        ray_calls = [(c["name"], c["arguments"]) for c in json.loads(b["tool_calls"] or "[]")]
        same["reasoning"] += a["reasoning"] == b["reasoning"]
        same["answer"] += a["answer"] == b["answer"]
        same["tool_calls"] += tb_calls == ray_calls
        same["rows"] += 1
    return same


def run(ctx: Context) -> dict[str, Any]:
    _require_ray()
    started_load = os.getloadavg()
    n = ctx.size(256, 64)
    max_tokens = ctx.size(128, 32)
    eff_inputs = prompts(ctx.work / "peer_inputs" / "efficiency.parquet", n)
    eff_sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    m = ctx.size(512, 128)
    short = ctx.size(16, 8)
    lengths = [short * 16 if i % 20 == 19 else short for i in range(m)]
    tail_inputs = prompts(ctx.work / "peer_inputs" / "heavy_tail.parquet", m,
                          max_tokens=lengths)
    tail_sampling = {"temperature": 0.0, "max_tokens": short * 16, "ignore_eos": True}

    figures: dict[str, Any] = {}
    part(figures, "efficiency", _throughput, ctx, "peer_efficiency", eff_inputs, eff_sampling)
    part(figures, "heavy_tail", _throughput, ctx, "peer_heavy_tail", tail_inputs,
         tail_sampling, input_extra={"sampling_column": "sampling"})
    if "error" not in figures["efficiency"]:  # its uninterrupted times set the kills
        part(figures, "resume", _resume, ctx, eff_inputs, eff_sampling,
             figures["efficiency"])
    part(figures, "user", _user, ctx)
    figures["load_avg"] = {"start": started_load, "end": os.getloadavg()}
    return {"settings": {"efficiency_rows": n, "efficiency_max_tokens": max_tokens,
                         "heavy_tail_rows": m, "heavy_tail_short_long": [short, short * 16],
                         "flush_rows": FLUSH_ROWS, "ray_defaults": RAY_DEFAULTS,
                         "ray_best": RAY_BEST, "max_in_flight": ctx.engine.get("max_in_flight")},
            "figures": figures, "summary": _summary(figures)}


def part(figures: dict[str, Any], name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """One part of the comparison; a failed one is reported without losing the others."""
    try:
        figures[name] = fn(*args, **kwargs)
    except Exception as e:
        traceback.print_exc()
        figures[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}


def _summary(f: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, rows_of in (("efficiency", _throughput_rows), ("heavy_tail", _throughput_rows),
                          ("resume", _resume_rows), ("user", _user_rows)):
        if name not in f:
            continue
        if "error" in f[name]:
            rows.append(row(f"{name}: failed", f[name]["error"][:300], Goal("ran", False)))
        else:
            rows += rows_of(name, f[name])
    return rows


def _throughput_rows(w: str, x: dict[str, Any]) -> list[dict[str, Any]]:
    tb = x["thinkbatch"]
    rows = [row(f"{w}: thinkbatch output tok/s (load excl.), wall incl. load",
                f"{tb['output_tokens_per_s']:,.0f}, {tb['wall_s']:.1f} s")]
    for label in ("ray_defaults", "ray_best"):
        r, ratio = x[label], x[f"thinkbatch_over_{label}"]
        rows.append(row(f"{w}: Ray Data LLM {_knobs(r['knobs'])}: output tok/s, wall",
                        f"{r['output_tokens_per_s']:,.0f}, {r['wall_s']:.1f} s"))
        rows.append(row(f"{w}: thinkbatch / Ray {_knobs(r['knobs'])}, load excl. / incl.",
                        f"{ratio['load_excluded']:.2f} / {ratio['load_included']:.2f}",
                        Goal(">= 1.0", ratio["load_excluded"] >= 1.0)))
    return rows


def _resume_rows(_: str, r: dict[str, Any]) -> list[dict[str, Any]]:
    tb, ray = r["thinkbatch"], r["ray_defaults_checkpointed"]
    rows = []
    for label, s in (("thinkbatch", tb), ("Ray (checkpoint by id)", ray)):
        rows.append(row(f"resume, {label}: on disk at the kill / generated by the rerun",
                        f"{s['rows_on_disk_at_kill']} / {s['rows_rerun_generated']} "
                        f"of {r['rows']}"))
        rows.append(row(f"resume, {label}: rerun wall / time the kill cost",
                        f"{s['wall_rerun_s']:.1f} s / {s['time_lost_s']:.1f} s"))
    rows.append(row("resume: rows regenerated, thinkbatch vs Ray",
                    f"{tb['rows_rerun_generated']} vs {ray['rows_rerun_generated']}",
                    Goal("strictly fewer",
                         tb["rows_rerun_generated"] < ray["rows_rerun_generated"])))
    rows.append(row("resume: time the kill cost, thinkbatch vs Ray",
                    f"{tb['time_lost_s']:.1f} s vs {ray['time_lost_s']:.1f} s",
                    Goal("strictly less", tb["time_lost_s"] < ray["time_lost_s"])))
    rows.append(row("resume: exactly once after the rerun (thinkbatch / Ray)",
                    f"{tb['distinct']}/{tb['rows_in_output']} / {ray['distinct']}/"
                    f"{ray['rows_in_output']} of {r['rows']}"))
    return rows


def _user_rows(_: str, u: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [row("bad rows, thinkbatch", ", ".join(
        f"{k}: {v}" for k, v in list(u["thinkbatch"]["statuses"].items())[-2:]))]
    null, long = sorted(u["ray_continue_on_error"]["bad_rows"])
    for label in ("ray_defaults", "ray_continue_on_error"):
        x = u[label]
        cause = re.search(r"(\w+Error: [^\n]{0,110})", x["error"] or "")
        said = x["bad_rows"].get(null, {})
        rows.append(row(f"bad rows, Ray {label.removeprefix('ray_')}",
                        f"{x['rows_written']} of {u['rows']} rows written"
                        + (f"; the job failed: {cause.group(1) if cause else x['error'][:110]}"
                           if x["error"] else "")
                        + ("; the null prompt got a completion" if said.get("reasoning")
                           or said.get("answer") else "")
                        + ("; the long prompt: " + x["bad_rows"][long]["__inference_error__"][:60]
                           if x["bad_rows"].get(long, {}).get("__inference_error__") else "")))
    same = u["same_parse_as_thinkbatch"]
    rows.append(row("same reasoning / answer / tool calls as thinkbatch (Ray + vLLM's parsers)",
                    f"{same['reasoning']} / {same['answer']} / {same['tool_calls']} "
                    f"of {same['rows']}"))
    return rows


def _knobs(k: dict[str, Any]) -> str:
    return f"(batch {k['batch_size']}, concurrent {k['max_concurrent_batches']})"


def sweep(ctx: Context) -> dict[str, Any]:
    """Ray's two knobs on the heavy-tailed rows (`--only peers_ray_sweep`); the best
    goes into RAY_BEST by hand, so the main benchmark stays within its minutes."""
    _require_ray()
    m, short = ctx.size(256, 64), ctx.size(16, 8)
    lengths = [short * 16 if i % 20 == 19 else short for i in range(m)]
    inputs = prompts(ctx.work / "sweep" / "prompts.parquet", m, max_tokens=lengths)
    sampling = {"temperature": 0.0, "max_tokens": short * 16, "ignore_eos": True}
    job = write_job(ctx.work / "sweep" / "job.json",
                    job_dict(ctx, inputs, ctx.work / "sweep" / "out", sampling=sampling,
                             rows_per_shard=128, flush_rows=FLUSH_ROWS,
                             input_extra={"sampling_column": "sampling"}))
    points = []
    for i, knobs in enumerate(SWEEP):
        out = ctx.work / "sweep" / f"ray_{i}"
        points.append(ray_figures(out, run_ray(ctx, f"sweep_{i}", job, out, knobs=knobs)))
    best = max(points, key=lambda p: p["output_tokens_per_s"])
    return {"settings": {"rows": m, "short_long": [short, short * 16], "sweep": SWEEP},
            "figures": {"points": points, "best": best["knobs"]},
            "summary": [row(f"Ray {_knobs(p['knobs'])}: output tok/s, wall",
                            f"{p['output_tokens_per_s']:,.0f}, {p['wall_s']:.1f} s")
                        for p in points]
            + [row("best", _knobs(best["knobs"]))]}
