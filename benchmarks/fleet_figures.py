"""The fleet simulation's figures, from what its run left behind (fleet_sim.py): the
simulated engines' event files, the product's trace (each row's submit and finish, each
commit), the S3 server's request log, the Prefect server's counts and the output itself.

Two views of the engines: the simulated engine's own exact slot use (its samples), and
what the product's records alone tell (`_rows`): each row's start and finish from the
trace, from which rows finished over time, each worker's output rate and its slot use
follow, as a user's report would draw them; the two agree where the records are right.

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
    pid: int
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
    aborted: dict[tuple[int, int], float] = field(default_factory=dict)  # (row, sample): a
    # lost claim's rows, dropped

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
    requests: np.ndarray  # (simulated time, pid, row, sample, finished?) of the trace's rows
    output_tokens: np.ndarray  # each row's output tokens (the simulated lengths)
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
        trace = _lines(fleet.trace)
        commits = sorted((to_sim(e["time"]), e["rows"]) for e in trace
                         if e.get("event") == "committed")
        requests = [(to_sim(e["time"]), e["pid"], e["row"], e["sample"],
                     e["event"] == "finished") for e in trace
                    if e.get("event") in ("submitted", "finished") and "turn" not in e]
        return cls(fleet.s, fleet.model, nodes, fleet.chaos,
                   np.array(commits, dtype=float).reshape(-1, 2),
                   np.array(requests, dtype=float).reshape(-1, 5), fleet.lengths.output,
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
    node = Node(launch.instance, launch.index, launch.listener, launch.proc.pid,
                launch.started, launch.ended if launch.ended is not None else ended,
                launch.fate, launch.rc)
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
        elif kind == "abort":
            node.aborted[_request(e["k"])] = e["t"]
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


def _edges(end: float) -> np.ndarray:
    return np.arange(0.0, end + BIN_S, BIN_S)


def _integral(times: np.ndarray, steps: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints and the running integral of min(level, cap), the level changing by
    `steps` at `times`: exact at any time by linear interpolation between them."""
    order = np.argsort(times, kind="stable")
    t, level = times[order], np.cumsum(steps[order])
    area = np.concatenate([[0.0], np.cumsum(np.minimum(level[:-1], cap) * np.diff(t))])
    return t, area


def _spread(start: np.ndarray, finish: np.ndarray, amount: np.ndarray,
            edges: np.ndarray) -> np.ndarray:
    """Each row's `amount` spread evenly over its start to finish, summed per bin."""
    span = np.maximum(finish - start, 1e-9)
    done = np.clip(edges[:, None] - start[None, :], 0.0, span[None, :]) / span[None, :]
    return np.diff(done @ amount)


def _request(key: str) -> tuple[int, int]:
    """(row, sample) of an engine request's key (row:sample, a turn after)."""
    row_index, sample = key.split(":")[:2]
    return int(row_index), int(sample)


def _keys(requests: np.ndarray) -> list[tuple[int, int]]:
    return [(int(x), int(y)) for x, y in requests[:, 2:4]]


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.percentile(values, [50, 90, 99])
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "mean": float(np.mean(values))}


def _rows(r: Records, end: float, t95: float) -> dict[str, Any]:
    """What the product's records say of the engines: each row's first submit and final
    finish (the finish by the node whose output was kept), and per node its requests'
    spans in the engine, submit to finish (to its abort, or the node's end, where the
    trace has no finish). From these: rows finished over time, per node the output rate
    (each row's tokens spread over its span) and slot use (rows in the engine, at most
    its slots), per simulated hour; and the rows an engine held on average, which a
    cap on requests in flight below its slots shows in. Also from the engines' records:
    the longest single attempt (submit to finish in one engine), and the poll lag, from
    a row's finish in the engine to the pipeline's taking it: a simulated engine polled
    late (a CPU-starved machine: the clock runs on) looks idle meanwhile."""
    q = r.requests
    rows = r.output["rows"]
    first = np.full(rows, np.inf)
    final = np.full(rows, np.nan)
    kept = r.output["generated_by"]
    sub = q[q[:, 4] == 0]
    np.minimum.at(first, sub[:, 2].astype(int), sub[:, 0])
    edges = _edges(end)
    per: dict[str, dict[str, Any]] = {}
    busy_s = slot_s = alive_s = in_engine_s = 0.0
    lags: list[float] = []
    attempts: list[float] = []
    fleet_busy, fleet_slots = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    for node in r.nodes:
        mine = q[q[:, 1] == node.pid]
        opened: dict[tuple[int, int], float] = {}
        spans: list[tuple[float, float, int, bool]] = []
        for t, _, index, sample, fin in mine:
            key = (int(index), int(sample))
            if not fin:
                opened[key] = t
            elif key in opened:
                spans.append((opened.pop(key), t, key[0], True))
        for (index, sample), t in opened.items():
            spans.append((t, node.aborted.get((index, sample), node.ended), index, False))
        a = np.array(spans, dtype=float).reshape(-1, 4)
        done = a[a[:, 3] == 1]
        engine_fin = {_request(k): t for k, t in node.finished.items()}
        taken = mine[mine[:, 4] == 1]
        lags += [t - engine_fin[key] for t, key in zip(taken[:, 0], _keys(taken))
                 if key in engine_fin]
        attempts += [t - node.submitted[k] for k, t in node.finished.items()
                     if k in node.submitted]
        ours = np.array([kept.get(int(x)) == node.name for x in done[:, 2]], dtype=bool)
        final[done[ours, 2].astype(int)] = done[ours, 1]
        tokens = r.output_tokens[done[:, 2].astype(int)].astype(float)
        rate = _spread(done[:, 0], done[:, 1], tokens, edges) / BIN_S
        moves = (np.concatenate([a[:, 0], a[:, 1]]),
                 np.concatenate([np.ones(len(a)), -np.ones(len(a))]))
        t, area = _integral(*moves, node.slots)
        t_all, area_all = _integral(*moves, len(a))
        busy = lambda x, b: float(np.interp(b, t, area, left=0.0)  # noqa: E731
                                  - np.interp(x, t, area, left=0.0)) if len(t) else 0.0
        bins = list(zip(edges[:-1], edges[1:]))
        fleet_busy += [busy(x, b) for x, b in bins]
        fleet_slots += [node.slots * node.alive(x, b) for x, b in bins]
        use = [None if node.alive(x, b) < 0.05 * BIN_S else
               round(busy(x, b) / (node.slots * node.alive(x, b)), 3) for x, b in bins]
        per[node.name] = {"slot_use": use, "output_tok_s": [round(float(v), 1) for v in rate],
                          "rows_finished": len(done), "rows_dropped": len(a) - len(done)}
        if node.slots:
            busy_s += busy(0.0, t95)
            slot_s += node.slots * node.alive(0.0, t95)
            alive_s += node.alive(0.0, t95)
            if len(t_all):
                in_engine_s += float(np.interp(t95, t_all, area_all))
    finished = np.sort(final[~np.isnan(final)])
    span = final - first
    longest = int(np.nanargmax(span)) if len(finished) else None

    def when(share: float) -> float:
        return float(finished[min(int(np.ceil(share * rows)) - 1, len(finished) - 1)])

    t90, t95f, last = (when(0.9), when(0.95), float(finished[-1])) if len(finished) else \
        (end, end, end)
    return {
        "rows_with_final_finish": len(finished),
        "t90_s": t90, "t95_s": t95f, "last_finish_s": last,
        "tail_last_10pct_share": (last - t90) / last if last else None,
        "slot_use_until_95pct_committed": busy_s / slot_s if slot_s else None,
        "in_engine_per_node_until_95pct": in_engine_s / alive_s if alive_s else None,
        "first_submit_s": float(first.min()) if len(sub) else None,
        "longest_row": None if longest is None else {
            "row": longest, "first_submit_s": float(first[longest]),
            "final_finish_s": float(final[longest]), "span_s": float(span[longest]),
            "output_tokens": int(r.output_tokens[longest]),
            "decode_s_at_full_speed": float(r.output_tokens[longest] * r.model.s_per_token)},
        "longest_attempt_s": max(attempts, default=None),
        "poll_lag_s": _quantiles(lags),
        "decode_s_p99_at_full_speed": float(np.percentile(r.output_tokens, 99)
                                            * r.model.s_per_token),
        "finished_series": {"bin_s": BIN_S, "rows": [int(x) for x in
                                                     np.searchsorted(finished, edges[1:],
                                                                     side="right")]},
        "fleet_slot_use": [round(float(b / n), 3) if n else None
                           for b, n in zip(fleet_busy, fleet_slots)],
        "nodes": per,
    }


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
    from_rows = _rows(r, max(end, r.ended), t95)
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
        "from_rows": from_rows,
        "full_output_tok_s": r.model.slots / r.model.s_per_token,
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
            *_row_rows(tag, f),
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


def _row_rows(tag: str, f: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures from the rows' start and finish (runs recorded before them have none)."""
    x = f.get("from_rows")
    if not x:
        return []
    longest = x["longest_row"]
    return [r for r in [
        row(f"{tag} the tail by the rows' final finish (trace): the last 10% of rows",
            f"{x['tail_last_10pct_share']:.1%} of the run to the last finish "
            f"({_hours(x['last_finish_s'] - x['t90_s'])} of {_hours(x['last_finish_s'])})"),
        row(f"{tag} slot use until 95% committed, from the rows' start and finish",
            f"{x['slot_use_until_95pct_committed']:.3f} (the engines' own: "
            f"{f['slot_use_until_95pct']:.3f}); rows in an engine: "
            f"{x['in_engine_per_node_until_95pct']:.0f} on average"),
        row(f"{tag} the pipeline took finished rows from the engine after (median, p90)",
            f"{x['poll_lag_s']['median'] / 60:,.0f} min, {x['poll_lag_s']['p90'] / 60:,.0f} min "
            f"(an engine step blocks at most {_step_s(f):.0f} s)") if x.get("poll_lag_s")
        else None,
        row(f"{tag} the longest row, first submit to final finish",
            f"{_hours(longest['span_s'])} = {longest['span_s'] / x['last_finish_s']:.1%} of "
            f"the run ({longest['output_tokens']:,} tokens: "
            f"{_hours(longest['decode_s_at_full_speed'])} of decoding at full speed; the "
            f"longest in one engine: {_hours(x['longest_attempt_s'] or 0)})"),
    ] if r is not None] if longest else []


def _step_s(f: dict[str, Any]) -> float:
    """The longest a simulated engine's step blocks, in simulated seconds."""
    s = f["settings"]
    return s["step_real_s"] / s["scale_wall_s_per_sim_s"]


def _grid(nodes: dict[str, Any], names: list[str], key: str) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in nodes[n][key]] for n in names],
                    dtype=float)


CHAOS_STYLE = {"kill": ("#e03131", "--"), "failed": ("#e03131", ":"),
               "pause": ("#f08c00", "--"), "continue": ("#f08c00", ":")}


def chart(f: dict[str, Any], path: Path) -> None:
    """Over simulated time: the fleet (slot use, rows finished and committed, the last
    10% of rows shaded), then per node process, a row each, its slot use and its output
    rate from the rows' start and finish (grey: no engine); kills and the pause marked.
    Runs recorded before the rows' times were drawn from the engines' samples alone."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows_view = f.get("from_rows")
    nodes = rows_view["nodes"] if rows_view else {
        n: {"slot_use": v} for n, v in f["slot_use_series"]["nodes"].items()}
    names = sorted(nodes)
    fates = {n["node"]: n["fate"] for n in f["nodes"]}
    use = _grid(nodes, names, "slot_use")
    hours = use.shape[1]
    panels = 3 if rows_view else 2
    fig = Figure(figsize=(10, 3.4 + (0.2 * len(names) + 0.4) * (panels - 1)), dpi=100,
                 layout="constrained")
    grid = fig.add_gridspec(panels, 2, width_ratios=[1, 0.018],
                            height_ratios=[2.6] + [0.2 * len(names) + 0.4] * (panels - 1))
    top = fig.add_subplot(grid[0, 0])
    heat = [fig.add_subplot(grid[i, 0], sharex=top) for i in range(1, panels)]
    # Hourly series, each from 0 to its own end: the engines' to the last commit, the
    # rows' to the last node's end.
    engines = np.array([np.nan if v is None else v for v in f["slot_use_series"]["fleet"]])
    top.stairs(engines, np.arange(len(engines) + 1), color="#1c7ed6", lw=1.6,
               label="slot use (the engines' own)")
    if rows_view:
        from_rows = np.array([np.nan if v is None else v for v in rows_view["fleet_slot_use"]])
        top.stairs(from_rows, np.arange(len(from_rows) + 1), color="#1c7ed6", lw=1.2, ls=":",
                   label="slot use (from the rows' start and finish)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("fleet slot use")
    top.axhline(GOAL_USE, color="#adb5bd", lw=0.8)
    total = f["output"]["rows"]
    right = top.twinx()
    committed = np.array(f["committed_series"], dtype=float).reshape(-1, 2)
    if rows_view:
        done = np.array(rows_view["finished_series"]["rows"], dtype=float)
        right.plot(np.arange(len(done) + 1), np.append(0, done) / total,
                   color="#2f9e44", lw=1.4, label="rows finished")
    if len(committed):
        right.plot(committed[:, 0] / 3600, committed[:, 1] / total, color="#2f9e44", lw=1.0,
                   ls="--", label="rows committed")
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of rows", color="#2f9e44")
    end = f["last_commit_s"] / 3600
    top.axvspan(f["t90_s"] / 3600, end, color="#f1f3f5", zorder=0)
    top.text(f["t90_s"] / 3600, 0.02, " last 10%\n of rows", fontsize=7, va="bottom",
             color="#495057")
    cmap = colormaps["viridis"].with_extremes(bad="#dee2e6")
    images = [(use, "slot use (rows in the engine / slots)", 1.0)]
    if rows_view:
        rate = _grid(nodes, names, "output_tok_s")
        rate[np.isnan(use)] = np.nan
        images.append((rate, f"output tok/s (full: {f['full_output_tok_s']:,.0f})",
                       f["full_output_tok_s"]))
    for i, (ax, (values, label, top_value)) in enumerate(zip(heat, images)):
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=0,
                          vmax=top_value, extent=(0, hours, len(names), 0),
                          interpolation="nearest")
        ax.set_yticks(np.arange(len(names)) + 0.5,
                      [f"{n} {fates.get(n, '')}".replace(" done", "") for n in names],
                      fontsize=7)
        ax.set_title(f"per node process: {label}", fontsize=9, loc="left")
        fig.colorbar(image, cax=fig.add_subplot(grid[i + 1, 1]))
    heat[-1].set_xlabel("simulated hours")
    for ax in heat[:-1] + [top]:
        ax.tick_params(labelbottom=False)
    for event in f["chaos"]:
        if event["kind"] in CHAOS_STYLE:
            color, style = CHAOS_STYLE[event["kind"]]
            for ax in (top, *heat):
                ax.axvline(event["t"] / 3600, color=color, lw=0.9, ls=style)
    top.set_xlim(0, hours)
    marks = [Line2D([], [], color=c, ls=ls, lw=0.9, label=k) for k, (c, ls) in
             CHAOS_STYLE.items() if any(e["kind"] == k for e in f["chaos"])]
    handles = top.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    top.legend(handles=handles + marks, loc="lower center", fontsize=7, ncols=4,
               framealpha=0.9, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"fleet simulation [{f.get('commit', '')[:8]}]: {total:,} rows, "
                 f"{len(names)} node processes; slot use until 95%: "
                 f"{f['slot_use_until_95pct']:.2f}, last 10% of rows: "
                 f"{f['tail_last_10pct_share']:.0%} of the run", fontsize=10)
    fig.savefig(path, format="png")
