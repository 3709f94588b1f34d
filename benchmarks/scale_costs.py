"""Benchmark: what a job's bookkeeping costs as it grows to 100k shards (no model).

Synthetic outputs only: part files, done markers and claims as a run leaves them, so
no engine loads and nothing here imports vLLM.

- finalize: what tasks/runner.py `finalize` does before writing the manifest (read every
  done marker, sweep orphan parts, sum the markers), at 1k / 10k / 100k shards on disk.
- claim_next: one worker's claims over a plan whose first half is done, at the same
  sizes: its first claim (which lists the store) and the mean of the claims after it.
- a shard's parts found locally (`parts_of`: a filtered scan of data/), at the same sizes.
- S3 requests per committed part on a moto server (every HTTP request counted, pyarrow's
  ranged reads too) for a worker's shard cycles (claim, committed keys, fenced part
  writes, mark done, release) with data/ at 100 and at 10,000 objects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
from context import Context
from summary import Goal, row

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import RunFigures
from thinkbatch.schemas.output import output_schema
from thinkbatch.schemas.plan import InputFile, Plan, Segment, Shard
from thinkbatch.tasks import runner
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.claims import ShardClaims
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage

GOAL_FINALIZE_S = 60.0  # at 100k shards
GOAL_FLAT = 0.10  # S3 requests per part: 10,000 objects in data/ within 10% of 100
ROWS_PER_SHARD = 1000
ORPHAN_EVERY = 100  # one fenced-out writer's part per 100 shards
CLAIMS_TIMED = 50
S3_SHARDS, S3_PARTS = 8, 2  # shard cycles counted, parts committed per shard


def _plan(n: int) -> Plan:
    total = n * ROWS_PER_SHARD
    files = [InputFile(path="synthetic.parquet", size=0, version="0", num_rows=total,
                       row_group_rows=[total], first_row=0)]
    shards = [Shard(shard_id=i, first_row=i * ROWS_PER_SHARD, num_rows=ROWS_PER_SHARD,
                    segments=[Segment(file=0, start=i * ROWS_PER_SHARD,
                                      stop=(i + 1) * ROWS_PER_SHARD)]) for i in range(n)]
    return Plan(files=files, shards=shards, total_rows=total, fingerprint="synthetic",
                fingerprint_parts={})


def _marker(part: str) -> dict[str, Any]:
    return {"rows": ROWS_PER_SHARD, "status": {"ok": ROWS_PER_SHARD},
            "prompt_tokens": 50 * ROWS_PER_SHARD, "completion_tokens": 900 * ROWS_PER_SHARD,
            "parts": [part]}


def _done_shards(root: Path, shard_ids: range) -> int:
    """Empty part files (only their names are listed) and markers; returns orphans made."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "_shards").mkdir(exist_ok=True)
    orphans = 0
    for s in shard_ids:
        part = f"{OutputLayout.part_prefix(s)}{uuid.uuid4().hex[:12]}.parquet"
        (root / "data" / part).touch()
        (root / "_shards" / f"{s:06d}.json").write_text(json.dumps(_marker(part)))
        if s % ORPHAN_EVERY == 0:
            (root / "data" / f"{OutputLayout.part_prefix(s)}{uuid.uuid4().hex[:12]}.parquet").touch()
            orphans += 1
    return orphans


def _finalize(job: JobSpec, layout: OutputLayout, plan: Plan) -> int:
    """The runner's finalize up to the manifest it would write."""
    run = RunFigures()
    runner.final_manifest(job, layout, plan, run)
    return run.orphan_parts_removed


class _CountingStorage(Storage):
    """The local store, counting its listings."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    def list_files(self, folder: str, *args: Any, **kwargs: Any) -> list[str]:
        self.listings += 1
        return super().list_files(folder, *args, **kwargs)


def _claims(work: Path, n: int) -> dict[str, Any]:
    """One worker's claims over a plan whose first half is done; each claimed shard is
    then marked done, as a worker would, outside the timing."""
    root = work / f"claims_{n}"
    _done_shards(root, range(n // 2))
    store = _CountingStorage()
    layout = OutputLayout(str(root), store)
    claims = ShardClaims(layout, _plan(n), "bench", ttl_s=600)
    times, listings = [], []
    for _ in range(CLAIMS_TIMED + 1):
        before, started = store.listings, time.perf_counter()
        shard_id = claims.claim_next()
        times.append(time.perf_counter() - started)
        listings.append(store.listings - before)
        store.write_atomic(layout.done_marker(shard_id), json.dumps(_marker("x")).encode())
        claims.release(shard_id)
    shutil.rmtree(root)
    return {"first_claim_ms": times[0] * 1e3, "first_claim_listings": listings[0],
            "claim_ms": sum(times[1:]) / CLAIMS_TIMED * 1e3,
            "listings_per_claim": sum(listings[1:]) / CLAIMS_TIMED}


def _finalize_case(work: Path, n: int) -> dict[str, Any]:
    """A finished output of n shards (one part each, plus orphans): a few shards' parts
    looked up, then finalize."""
    root = work / f"finalize_{n}"
    orphans = _done_shards(root, range(n))
    layout = OutputLayout(str(root), Storage())
    looked = range(0, n, max(n // 40, 1))
    started = time.perf_counter()
    for s in looked:
        assert layout.parts_of(s)
    parts_of_ms = (time.perf_counter() - started) / len(looked) * 1e3
    data_files = len(os.listdir(root / "data"))
    job = load_job(inline={"input": {"path": "synthetic.parquet"}, "engine": {"model": "m"},
                           "output": {"path": str(root)}})
    started = time.perf_counter()
    removed = _finalize(job, layout, _plan(n))
    out = {"finalize_s": time.perf_counter() - started, "orphans": orphans,
           "orphans_removed": removed,
           "finalize_ok": removed == orphans and len(layout.all_parts()) == n,
           "parts_of_ms": parts_of_ms, "data_files": data_files}
    shutil.rmtree(root)
    return out


def _local(work: Path, n: int) -> dict[str, Any]:
    return {"shards": n, **_claims(work, n), **_finalize_case(work, n)}


class _CountingS3:
    """moto's server app behind a counter of every HTTP request it serves."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,
                                                   MotoRequestHandler, create_backend_app)
        from werkzeug.serving import make_server

        self.requests: Counter[str] = Counter()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            query = environ.get("QUERY_STRING", "")
            kind = "LIST" if "list-type" in query else environ["REQUEST_METHOD"]
            self.requests[kind] += 1
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counted, True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


def _shard_cycle(layout: OutputLayout, claims: ShardClaims, table: pa.Table) -> None:
    """What a worker does per shard, less generation: claim, look up committed rows,
    commit parts with a fencing renewal before each, mark done, release."""
    shard_id = claims.claim_next()
    checkpoint.committed_keys(layout, shard_id)
    rows = ROWS_PER_SHARD // S3_PARTS
    for k in range(S3_PARTS):
        assert claims.still_ours(shard_id)
        layout.store.write_parquet(layout.new_part(shard_id), table.slice(k * rows, rows))
    assert claims.still_ours(shard_id)
    checkpoint.mark_done(layout, shard_id)
    claims.release(shard_id)


def _s3(work: Path, sizes: list[int]) -> dict[str, Any]:
    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = _CountingS3()
    os.environ["AWS_ENDPOINT_URL"] = server.url
    client = boto3.client("s3", endpoint_url=server.url)
    rows = [{"id": f"r{i}", "row_index": i, "sample_index": 0, "status": "ok",
             "prompt_tokens": 50, "completion_tokens": 900} for i in range(ROWS_PER_SHARD)]
    table = pa.Table.from_pylist(rows, schema=output_schema())
    out: dict[str, Any] = {}
    try:
        for size in sizes:
            bucket = f"scale-{size}"
            client.create_bucket(Bucket=bucket)

            def done(s: int) -> None:  # another worker's finished shard
                part = f"{OutputLayout.part_prefix(s)}{uuid.uuid4().hex[:12]}.parquet"
                client.put_object(Bucket=bucket, Key=f"out/data/{part}", Body=b"x")
                client.put_object(Bucket=bucket, Key=f"out/_shards/{s:06d}.json",
                                  Body=json.dumps(_marker(part)).encode())

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(done, range(size)))
            plan = _plan(size + S3_SHARDS + 1)
            layout = OutputLayout(f"s3://{bucket}/out", Storage())
            claims = ShardClaims(layout, plan, "bench", ttl_s=600, start_at=size)
            before = Counter(server.requests)
            _shard_cycle(layout, claims, table)  # the worker's first claim lists the store
            first = Counter(server.requests)
            for _ in range(S3_SHARDS):
                _shard_cycle(layout, claims, table)
            steady = server.requests - first
            parts = S3_SHARDS * S3_PARTS
            out[str(size)] = {
                "objects_in_data": size,
                "requests_per_part": sum(steady.values()) / parts,
                "by_kind_per_part": {k: v / parts for k, v in sorted(steady.items())},
                "first_cycle_requests": sum((first - before).values()),
            }
    finally:
        server.stop()
    return out


def run(ctx: Context) -> dict[str, Any]:
    sizes = [1_000, 10_000] if ctx.quick else [1_000, 10_000, 100_000]
    s3_sizes = [100, 1_000] if ctx.quick else [100, 10_000]
    local = {n: _local(ctx.work, n) for n in sizes}
    s3 = _s3(ctx.work, s3_sizes)
    lo, hi = s3[str(s3_sizes[0])], s3[str(s3_sizes[-1])]
    growth = hi["requests_per_part"] / lo["requests_per_part"] - 1
    summary = [row(f"finalize at {n:,} shards (markers read, orphans swept, manifest summed)",
                   f"{local[n]['finalize_s']:.2f} s ({local[n]['orphans_removed']} of "
                   f"{local[n]['orphans']} orphans removed)",
                   Goal(f"<= {GOAL_FINALIZE_S:.0f} s", local[n]["finalize_s"] <= GOAL_FINALIZE_S
                        and local[n]["finalize_ok"]) if n == 100_000 else None)
               for n in sizes]
    summary += [row(f"claim_next at {n:,} shards (half done): first / each after",
                    f"{local[n]['first_claim_ms']:.1f} ms / {local[n]['claim_ms']:.2f} ms "
                    f"(listings: {local[n]['first_claim_listings']} / "
                    f"{local[n]['listings_per_claim']:g})") for n in sizes]
    summary += [row(f"a shard's parts found locally, {local[n]['data_files']:,} files in data/",
                    f"{local[n]['parts_of_ms']:.1f} ms") for n in sizes]
    summary += [row(f"S3 requests per committed part, {int(k):,} objects in data/",
                    f"{v['requests_per_part']:.2f} ("
                    + ", ".join(f"{kind} {n:.2f}" for kind, n in v["by_kind_per_part"].items())
                    + f"); worker's first shard cycle {v['first_cycle_requests']}")
                for k, v in s3.items()]
    summary.append(row("S3 requests per part: growth with the output",
                       f"{growth:+.1%} ({s3_sizes[0]:,} -> {s3_sizes[-1]:,} objects)",
                       Goal(f"flat (within +-{GOAL_FLAT:.0%})", abs(growth) <= GOAL_FLAT)))
    return {"settings": {"sizes": sizes, "s3_sizes": s3_sizes, "rows_per_shard": ROWS_PER_SHARD,
                         "orphan_every": ORPHAN_EVERY, "claims_timed": CLAIMS_TIMED,
                         "s3_shard_cycles": S3_SHARDS, "s3_parts_per_shard": S3_PARTS},
            "figures": {"local": {str(n): v for n, v in local.items()}, "s3": s3,
                        "s3_growth": growth},
            "summary": summary,
            "notes": ["local: one process, files on the benchmark's scratch disk; parts are "
                      "empty files (finalize and claims only list names and read markers)",
                      "claim_next after the first: mostly the fsync of the claim file and "
                      "starting its renewal thread, so it follows the disk's load, not the "
                      "number of shards; the listings it makes are the size-bound part",
                      "S3: moto server in-process; 'first shard cycle' includes the worker's "
                      "one-time listing of _shards/, _claims/ and data/"]}
