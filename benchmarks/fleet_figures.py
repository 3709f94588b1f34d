"""The fleet simulation's figures, from what its run left behind (fleet_sim.py): the
simulated engines' event files, the product's trace of commits, the S3 server's request
log, the Prefect server's counts and the output itself.

Times are simulated seconds from the run's start (the go file), except where a figure
says wall: the S3 requests of an idle node are per wall minute, as the worker loop's
constants are wall seconds.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from summary import Goal, row

GOAL_USE = 0.95  # slot use until the last 5% of rows
GOAL_TAIL = 0.15  # the last 10% of rows, as a share of the run
BIN_S = 3600.0  # the per-node series: one value per simulated hour


@dataclass
class Node:
    """One node process as its engine recorded it."""

    name: str
    index: int
    listener: int
    started: float
    ended: float
    fate: str
    rc: int | None
    claimed: float | None = None  # its first claim: the engine starts loading
    loaded: float | None = None
    load_s: float | None = None
    slots: int = 0
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # t busy dec run wait
    submitted: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    preemptions: int = 0
    recomputed_tokens: int = 0

    def busy_at(self, t: float) -> float:
        """Busy slot-seconds up to `t` (exact at samples, linear between them)."""
        if not len(self.samples) or self.loaded is None or t <= self.loaded:
            return 0.0
        return float(np.interp(min(t, self.ended), self.samples[:, 0], self.samples[:, 1],
                               left=0.0))

    def alive(self, a: float, b: float) -> float:
        """Seconds of [a, b] this node had an engine."""
        if self.loaded is None:
            return 0.0
        return max(0.0, min(b, self.ended) - max(a, self.loaded))


@dataclass
class Records:
    settings: Any
    model: Any
    nodes: list[Node]
    chaos: list[dict[str, Any]]
    commits: np.ndarray  # (simulated time, rows) of each committed part, in time order
    s3: list[tuple[int, float, str, str, int, str]]  # listener, time, kind, area, status, claim
    prefect: dict[str, Any]
    output: dict[str, Any]
    shards: int
    ended: float

    @classmethod
    def read(cls, fleet: Any, s3_log: list, prefect: dict[str, Any], ended: float) -> Records:
        to_sim = lambda t: (t - fleet.t0) / fleet.s.scale  # noqa: E731
        nodes = [_node(fleet.work / "events" / f"{x.instance}.jsonl", x, ended)
                 for x in fleet.launches]
        commits = sorted((to_sim(e["time"]), e["rows"]) for e in _lines(fleet.trace)
                         if e.get("event") == "committed")
        return cls(fleet.s, fleet.model, nodes, fleet.chaos,
                   np.array(commits, dtype=float).reshape(-1, 2),
                   [(i, to_sim(t), *rest) for i, t, *rest in s3_log],
                   prefect, _output(fleet.layout, fleet.plan), len(fleet.plan.shards), ended)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:  # empty, or cut by a SIGKILL
            continue
    return out


def _node(path: Path, launch: Any, ended: float) -> Node:
    node = Node(launch.instance, launch.index, launch.listener, launch.started,
                launch.ended if launch.ended is not None else ended, launch.fate, launch.rc)
    samples = []
    for e in _lines(path):
        kind = e["e"]
        if kind == "up":
            node.started = e["t"]
        elif kind == "load":
            node.claimed, node.load_s = e["t"], e["load_s"]
        elif kind == "loaded":
            node.loaded, node.slots = e["t"], e["slots"]
            samples.append((e["t"], 0.0, 0, 0, 0))
        elif kind == "use":
            samples.append((e["t"], e["busy"], e["dec"], e["run"], e["wait"]))
        elif kind == "sub":
            node.submitted[e["k"]] = e["t"]
        elif kind == "fin":
            node.finished[e["k"]] = e["t"]
        elif kind == "pre":
            node.preemptions += 1
            node.recomputed_tokens += e["done"]
    if samples:
        node.samples = np.array(samples, dtype=float)
    return node


def _output(layout: Any, plan: Any) -> dict[str, Any]:
    """Every row of the output as a finished job would keep it: the parts its shards'
    markers list (finalize removes the rest as orphans), each part read whole."""
    import boto3
    import pyarrow.parquet as pq

    from thinkbatch.tasks.store import checkpoint

    markers = checkpoint.read_markers(layout, [s.shard_id for s in plan.shards])
    listed = {n for m in markers.values() if m is not None for n in m.parts}
    names = [n for n in layout.store.list_files(layout.data, ".parquet")]
    client = boto3.client("s3")

    bucket, _, prefix = layout.data.removeprefix("s3://").partition("/")

    def read(name: str) -> Any:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        return name, pq.read_table(io.BytesIO(body), columns=[
            "row_index", "answer", "status", "completion_tokens"])

    with ThreadPoolExecutor(8) as pool:
        tables = dict(pool.map(read, names))
    copies: Counter[int] = Counter()
    by: dict[int, str] = {}
    status: Counter[str] = Counter()
    tokens = 0
    orphan_rows = 0
    for name, t in tables.items():
        if name not in listed:
            orphan_rows += t.num_rows
            continue
        rows = t.column("row_index").to_pylist()
        copies.update(rows)
        by.update(zip(rows, t.column("answer").to_pylist()))
        status.update(t.column("status").to_pylist())
        tokens += sum(x or 0 for x in t.column("completion_tokens").to_pylist())
    return {"shards_unfinished": sum(m is None for m in markers.values()),
            "rows": plan.total_rows, "distinct": len(copies),
            "lost": plan.total_rows - len(copies),
            "duplicated": sum(c - 1 for c in copies.values()),
            "parts": len(listed), "orphan_parts": len(names) - len(listed),
            "orphan_rows": orphan_rows, "status": dict(status), "output_tokens": tokens,
            "generated_by": by}


# -- figures ----------------------------------------------------------------------------

def _when(commits: np.ndarray, rows: float) -> float:
    """When the committed rows first reached `rows`."""
    total = np.cumsum(commits[:, 1])
    i = int(np.searchsorted(total, rows - 0.5))
    return float(commits[min(i, len(commits) - 1), 0])


def _use(nodes: list[Node], a: float, b: float) -> float | None:
    slot_s = sum(n.slots * n.alive(a, b) for n in nodes)
    busy = sum(n.busy_at(min(b, n.ended)) - n.busy_at(max(a, n.loaded or a)) for n in nodes
               if n.alive(a, b))
    return busy / slot_s if slot_s else None


def _series(nodes: list[Node], end: float) -> dict[str, Any]:
    """Slot use per simulated hour, per node and over the fleet (None: no engine)."""
    edges = np.arange(0.0, end + BIN_S, BIN_S)
    per = {n.name: [None if n.alive(a, b) < 0.05 * BIN_S else
                    round((n.busy_at(min(b, n.ended)) - n.busy_at(max(a, n.loaded or a)))
                          / (n.slots * n.alive(a, b)), 3)
                    for a, b in zip(edges[:-1], edges[1:])] for n in nodes}
    fleet = [_use(nodes, a, b) for a, b in zip(edges[:-1], edges[1:])]
    return {"bin_s": BIN_S, "fleet": [None if u is None else round(u, 3) for u in fleet],
            "nodes": per}


def _lost_work(r: Records) -> list[dict[str, Any]]:
    """Per node that lost rows: rows it had taken whose output came from another node."""
    by = r.output["generated_by"]
    out = []
    for n in r.nodes:
        taken = {int(k.split(":")[0]) for k in n.submitted}
        again = [i for i in taken if by.get(i) not in (None, n.name)]
        if not again and n.fate == "done":
            continue
        finished = {int(k.split(":")[0]) for k in n.finished}
        last = n.samples[-1] if len(n.samples) else None
        out.append({"node": n.name, "fate": n.fate,
                    "event": next((c["kind"] for c in r.chaos if c.get("instance") == n.name
                                   and c["kind"] in ("kill", "pause", "failed")), None),
                    "rows_regenerated": len(again),
                    "of_which_finished_not_committed": len(set(again) & finished),
                    "in_engine_at_last_sample": int(last[3] + last[4]) if last is not None
                    else 0, "slots": n.slots})
    return out


def _claimless(r: Records, ours: dict[int, Node]) -> dict[int, list[tuple[float, float]]]:
    """Per node, the spans in which it held no claim (nothing to work on: it looks for
    shards), from the claims' writes: a write that took a claim gives it to its writer
    (from a previous holder, on a takeover), a release ends it."""
    holder: dict[str, int] = {}
    moves: dict[int, list[tuple[float, int]]] = {i: [] for i in ours}
    for listener, t, kind, area, status, claim in r.s3:
        if area != "_claims" or listener not in ours or not claim:
            continue
        if kind == "PUT_IF" and status == 200 and holder.get(claim) != listener:
            if claim in holder:
                moves[holder[claim]].append((t, -1))
            holder[claim] = listener
            moves[listener].append((t, 1))
        elif kind == "DELETE" and holder.get(claim) == listener:
            del holder[claim]
            moves[listener].append((t, -1))
    spans = {}
    for listener, node in ours.items():
        out, level, since = [], 0, node.started
        for t, step in moves[listener]:
            if level == 0 and step > 0 and t > since:
                out.append((since, t))
            level += step
            if level == 0:
                since = t
        if level == 0 and node.ended > since:
            out.append((since, node.ended))
        spans[listener] = [(max(a, node.started), min(b, node.ended)) for a, b in out
                           if min(b, node.ended) > max(a, node.started)]
    return spans


def _s3(r: Records) -> dict[str, Any]:
    ours = {n.listener: n for n in r.nodes}
    kinds: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    idle_requests, idle_kinds = 0, Counter()
    spans = _claimless(r, ours)
    for listener, t, kind, area, _, _ in r.s3:
        if listener not in ours:
            continue
        kinds[kind] += 1
        areas[area] += 1
        if any(a <= t < b for a, b in spans[listener]):
            idle_requests += 1
            idle_kinds[f"{kind} {area}"] += 1
    total = sum(kinds.values())
    idle_wall_min = sum(b - a for s in spans.values() for a, b in s) * r.settings.scale / 60
    rows = r.output["rows"]
    parts = r.output["parts"] + r.output["orphan_parts"]
    return {"requests": total, "per_1000_rows": total / rows * 1000,
            "by_kind_per_1000_rows": {k: round(v / rows * 1000, 1) for k, v in kinds.most_common()},
            "by_area_per_1000_rows": {k: round(v / rows * 1000, 1) for k, v in areas.most_common()},
            "parts": parts, "parts_per_shard": parts / r.shards,
            "data_requests_per_part": areas["data"] / parts if parts else None,
            "idle_node_wall_minutes": idle_wall_min,
            "idle_node_sim_hours": idle_wall_min * 60 / r.settings.scale / 3600,
            "idle_requests": idle_requests,
            "per_idle_node_wall_minute": idle_requests / idle_wall_min if idle_wall_min else None,
            "idle_by_kind": dict(idle_kinds.most_common(8)), "claims": _claims(r, ours)}


DEFAULT_TTL_S = 120.0  # ScaleSpec.claim_ttl_s's default: renewed every TTL/4


def _claims(r: Records, ours: dict[int, Node]) -> dict[str, Any]:
    """Claim traffic: writes that took or renewed a claim, writes refused (a live
    holder's), and the time claims were held, from the first write that took one to its
    release. Timed renewals follow that time over TTL/4: at the default TTL a fleet holding
    claims as long would renew `renewals_per_1000_rows_at_default_ttl` times."""
    held_since: dict[str, float] = {}
    held_s = 0.0
    ok = refused = 0
    for listener, t, kind, area, status, claim in r.s3:
        if area != "_claims" or listener not in ours or not claim:
            continue
        if kind == "PUT_IF":
            if status == 200:
                ok += 1
                held_since.setdefault(claim, t)
            else:
                refused += 1
        elif kind == "DELETE" and claim in held_since:
            held_s += t - held_since.pop(claim)
    held_s += sum(r.ended - t for t in held_since.values())
    rows = r.output["rows"]
    return {"writes_ok_per_1000_rows": ok / rows * 1000,
            "writes_refused_per_1000_rows": refused / rows * 1000,
            "held_sim_hours": held_s / 3600, "ttl_sim_s": r.settings.claim_ttl_sim_s,
            "renewals_per_1000_rows_at_default_ttl":
                held_s / (DEFAULT_TTL_S / 4) / rows * 1000}


def _prefect(r: Records) -> dict[str, Any]:
    http = Counter(r.prefect.get("http", {}))
    sockets = Counter(r.prefect.get("websocket_messages", {}))
    return {"http_requests": sum(http.values()), "websocket_messages": sum(sockets.values()),
            "http_per_shard": sum(http.values()) / r.shards,
            "websocket_messages_per_shard": sum(sockets.values()) / r.shards,
            "top_http": dict(http.most_common(10)), "websockets": dict(sockets)}


def figures(r: Records) -> dict[str, Any]:
    rows = r.output["rows"]
    c = r.commits
    end = float(c[-1, 0]) if len(c) else r.ended
    t90, t95 = (_when(c, 0.9 * rows), _when(c, 0.95 * rows)) if len(c) else (end, end)
    lost = _lost_work(r)
    output = {k: v for k, v in r.output.items() if k != "generated_by"}
    return {
        "time_unit": "simulated seconds unless named wall",
        "sim_hours": end / 3600, "last_commit_s": end, "t90_s": t90, "t95_s": t95,
        "nodes_ended_s": r.ended,
        "slot_use_until_95pct": _use(r.nodes, 0.0, t95),
        "slot_use_whole_run": _use(r.nodes, 0.0, end),
        "tail_last_10pct_share": (end - t90) / end if end else None,
        "lost_work": lost,
        "rows_regenerated_per_kill": [x["rows_regenerated"] for x in lost
                                      if x["event"] == "kill"],
        "preemptions": sum(n.preemptions for n in r.nodes),
        "recomputed_tokens": sum(n.recomputed_tokens for n in r.nodes),
        "s3": _s3(r), "prefect": _prefect(r), "output": output,
        "nodes": [{"node": n.name, "fate": n.fate, "rc": n.rc, "started_s": n.started,
                   "first_claim_s": n.claimed, "loaded_s": n.loaded, "ended_s": n.ended, "slots": n.slots,
                   "rows_finished": len(n.finished), "preemptions": n.preemptions}
                  for n in r.nodes],
        "chaos": r.chaos,
        "slot_use_series": _series(r.nodes, end),
        "committed_series": [[round(t, 1), int(n)] for t, n in
                             zip(c[:, 0], np.cumsum(c[:, 1]))][:: max(len(c) // 400, 1)],
    }


# -- the report's rows and chart ---------------------------------------------------------

def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h"


def summary_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, f in runs.items():
        tag = f"[{label} {f.get('commit', '')[:8]}]"
        use, tail = f["slot_use_until_95pct"], f["tail_last_10pct_share"]
        kills = f["rows_regenerated_per_kill"]
        slots = max((n["slots"] for n in f["nodes"]), default=0)
        o, s3, pf = f["output"], f["s3"], f["prefect"]
        out += [
            row(f"{tag} the run: simulated time to the last commit (wall)",
                f"{_hours(f['last_commit_s'])} ({f['run_wall_s']:.0f} s wall at 1 h = "
                f"{f['settings']['sim_hour_s']:g} s; whole benchmark {f['wall_s']:.0f} s)"),
            row(f"{tag} engine slot use until 95% of rows are committed",
                f"{use:.3f} (whole run {f['slot_use_whole_run']:.3f})",
                Goal(f">= {GOAL_USE}", use >= GOAL_USE)),
            row(f"{tag} the tail: wall time of the last 10% of rows",
                f"{tail:.1%} of the run ({_hours(f['last_commit_s'] - f['t90_s'])} of "
                f"{_hours(f['last_commit_s'])})", Goal(f"<= {GOAL_TAIL:.0%}", tail <= GOAL_TAIL)),
            row(f"{tag} rows regenerated per kill",
                ", ".join(map(str, kills)) + f" (slots per engine: {slots})",
                Goal(f"<= slots ({slots})", bool(kills) and max(kills) <= slots)),
            row(f"{tag} the paused node (past its claim TTL)",
                "; ".join(f"{x['node']}: {x['fate']}, {x['rows_regenerated']} rows regenerated"
                          for x in f["lost_work"] if x["event"] == "pause") or "lost nothing"),
            row(f"{tag} KV preemptions (tokens prefilled again)",
                f"{f['preemptions']:,} ({f['recomputed_tokens']:,})"),
            row(f"{tag} S3 requests per 1,000 rows",
                f"{s3['per_1000_rows']:,.0f} (" + ", ".join(
                    f"{k} {v:g}" for k, v in list(s3["by_kind_per_1000_rows"].items())[:5]) + ")"),
            row(f"{tag} S3 requests per idle node-minute (wall)",
                f"{s3['per_idle_node_wall_minute']:,.0f} over "
                f"{s3['idle_node_wall_minutes']:.1f} idle node-minutes"
                if s3["per_idle_node_wall_minute"] is not None else "no idle node"),
            row(f"{tag} Prefect API per shard: HTTP requests, event messages",
                f"{pf['http_per_shard']:.1f}, {pf['websocket_messages_per_shard']:.1f}"),
            row(f"{tag} rows lost / duplicated (of {o['rows']:,})",
                f"{o['lost']} / {o['duplicated']} ({o['orphan_parts']} orphan parts, "
                f"{o['shards_unfinished']} shards unfinished)",
                Goal("0 / 0", o["lost"] == 0 and o["duplicated"] == 0
                     and o["shards_unfinished"] == 0)),
        ]
    return out


def chart(f: dict[str, Any], path: Path) -> None:
    """Slot use per node over simulated time (a row per node process, grey where it had
    no engine), the fleet's slot use and rows committed above, kills and the pause
    marked."""
    from matplotlib.figure import Figure

    series = f["slot_use_series"]
    names = sorted(series["nodes"])
    grid = np.array([[np.nan if v is None else v for v in series["nodes"][n]] for n in names])
    hours = grid.shape[1]
    fig = Figure(figsize=(9.5, 7.5), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2.4]})
    x = np.arange(hours) + 0.5
    fleet = np.array([np.nan if v is None else v for v in series["fleet"]])
    top.plot(x, fleet, color="#1c7ed6", label="fleet slot use")
    top.set_ylim(0, 1.05)
    top.set_ylabel("slot use")
    committed = np.array(f["committed_series"], dtype=float).reshape(-1, 2)
    if len(committed):
        ax2 = top.twinx()
        ax2.plot(committed[:, 0] / 3600, committed[:, 1] / f["output"]["rows"],
                 color="#2f9e44", label="rows committed")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("rows committed", color="#2f9e44")
    top.legend(loc="lower left", fontsize=8)
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="#dee2e6")
    image = bottom.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                          extent=(0, hours, len(names), 0), interpolation="nearest")
    bottom.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=6)
    bottom.set_xlabel("simulated hours")
    for event in f["chaos"]:
        if event["kind"] in ("kill", "pause", "continue", "failed"):
            color = {"kill": "#e03131", "failed": "#e03131"}.get(event["kind"], "#f08c00")
            for ax in (top, bottom):
                ax.axvline(event["t"] / 3600, color=color, lw=0.8, ls="--")
    fig.colorbar(image, ax=bottom, label="slot use", fraction=0.03)
    top.set_title(f"fleet simulation [{f.get('commit', '')[:8]}]: "
                  f"{f['output']['rows']:,} rows, {len(names)} node processes", fontsize=10)
    fig.savefig(path, format="png")
