"""Benchmark 4: what a kill costs: rows generated twice because a run died.

One output, killed several times (SIGKILL of the process group right after the run's
1st, 3rd, ... commit) and resumed each time, then finished. For each kill, the rows it
had submitted but not committed are exactly the rows a later run must generate again;
they are compared with the bound the design promises: in flight plus not yet flushed
(engine.max_in_flight + output.flush_rows).
"""

from __future__ import annotations

from typing import Any

from context import Context
from harness import committed_row_indices, job_dict, output_columns, run_cli, write_job
from summary import Goal, row
from workloads import prompts

FLUSH_ROWS = 32


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(768, 384)
    kill_points = [1, 3] if ctx.quick else [1, 3, 5]
    max_tokens = 32 if ctx.mini else 64
    in_flight = ctx.engine.get("max_in_flight", 512)
    d = ctx.work / "resume"
    inputs = prompts(d / "prompts.parquet", n)
    sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    job = write_job(d / "job.json", job_dict(ctx, inputs, d / "out", sampling=sampling,
                                             rows_per_shard=256, flush_rows=FLUSH_ROWS))
    kills, later = [], []
    for k in kill_points:
        before = committed_row_indices(d / "out")
        res = run_cli(ctx, job, kill_after_commits=k)
        after = committed_row_indices(d / "out")
        kills.append({"after_commit": k, "killed": res.killed, "submitted": res.submitted,
                      "committed_by_run": len(after - before),
                      "lost": res.submitted - after})
        later.append(res.submitted)
    final = run_cli(ctx, job)
    later.append(final.submitted)
    ids = output_columns(d / "out", ["row_index"])["row_index"]
    bound = in_flight + FLUSH_ROWS
    per_kill = []
    for i, k in enumerate(kills):
        regenerated = k["lost"] & set().union(*later[i + 1:])
        per_kill.append({"after_commit": k["after_commit"], "killed": k["killed"],
                         "submitted": len(k["submitted"]),
                         "committed_by_run": k["committed_by_run"],
                         "regenerated": len(regenerated),
                         "lost_not_regenerated": len(k["lost"] - regenerated)})
    exactly_once = len(ids) == n and len(set(ids)) == n
    worst = max(p["regenerated"] for p in per_kill)
    summary = [row(f"kill after commit {p['after_commit']}: rows regenerated",
                   f"{p['regenerated']} (submitted {p['submitted']}, committed "
                   f"{p['committed_by_run']})",
                   Goal(f"<= {bound} (in flight {in_flight} + flush {FLUSH_ROWS})",
                        p["regenerated"] <= bound and p["killed"]))
               for p in per_kill]
    summary.append(row("exactly once after the final run", f"{len(ids)} rows, "
                       f"{len(set(ids))} distinct, of {n}", Goal("all, once", exactly_once)))
    return {"settings": {"rows": n, "rows_per_shard": 256, "flush_rows": FLUSH_ROWS,
                         "max_in_flight": in_flight, "kill_after_commits": kill_points,
                         "sampling": sampling},
            "figures": {"kills": per_kill, "bound": bound, "worst": worst,
                        "worst_over_in_flight": worst / in_flight,
                        "exactly_once": exactly_once},
            "summary": summary}
