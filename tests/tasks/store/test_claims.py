"""Shard claims between workers, with a real stalled process (SIGSTOP) for fencing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from tests.conftest import prompt_rows, write_prompts
from tests.tasks.store.test_checkpoint import CountingStorage
from tests.tasks.store.test_lease import dead_pid, holder_record
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.claims import ShardClaims
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

STORE = Storage()

STALLED_WORKER = """
import json, sys
import pyarrow as pa
from thinkbatch.schemas.output import output_schema
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.store.checkpoint import read_plan
from thinkbatch.tasks.store.claims import ShardClaims
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage

layout = OutputLayout(sys.argv[1], Storage())
claims = ShardClaims(layout, read_plan(layout), "stalled", ttl_s=1.0)
print(claims.claim_next(), flush=True)
sys.stdin.readline()  # stalled here (SIGSTOP) until the test lets it go on
ours = claims.still_ours(0)
if ours:
    rows = [{"id": "zombie", "row_index": 0, "sample_index": 0, "status": "ok"}]
    layout.store.write_parquet(layout.new_part(0), pa.Table.from_pylist(rows, schema=output_schema()))
print(json.dumps({"still_ours": ours}), flush=True)
"""


def _layout(tmp_path: Path, rows: int = 30) -> tuple[OutputLayout, object]:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(rows))
    job = load_job(inline={"input": {"path": str(inputs)}, "shards": {"rows_per_shard": 10},
                           "engine": {"model": "m"}, "output": {"path": str(tmp_path / "out")}})
    layout = OutputLayout(job.output.path, STORE)
    plan, _ = checkpoint.open_plan(layout, make_plan(job, STORE))
    return layout, plan


def test_workers_take_different_shards_and_skip_done_ones(tmp_path: Path) -> None:
    layout, plan = _layout(tmp_path)
    a = ShardClaims(layout, plan, "a", ttl_s=60)
    b = ShardClaims(layout, plan, "b", ttl_s=60, start_at=1)
    assert (a.claim_next(), b.claim_next(), a.claim_next()) == (0, 1, 2)
    assert b.claim_next() is None  # all three held by live workers
    STORE.write_atomic(layout.done_marker(0), json.dumps({"parts": []}).encode())
    a.release_all()
    assert b.claim_next() == 2 and b.unfinished() == [1, 2]
    b.release_all()


def test_stalled_worker_loses_its_shard_and_cannot_commit(tmp_path: Path) -> None:
    layout, plan = _layout(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WORKER, layout.root],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"
    proc.send_signal(signal.SIGSTOP)
    time.sleep(1.5)  # its claim's TTL passes without renewal
    for done in (1, 2):  # only the stalled worker's shard is left
        STORE.write_atomic(layout.done_marker(done), json.dumps({"parts": []}).encode())
    other = ShardClaims(layout, plan, "other", ttl_s=60)
    assert other.claim_next() == 0  # taken over: the shard is redone elsewhere
    rows = [{"id": f"r{i}", "row_index": i, "sample_index": 0, "status": "ok"} for i in range(10)]
    STORE.write_parquet(layout.new_part(0), pa.Table.from_pylist(rows, schema=output_schema()))
    assert other.still_ours(0)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate("go\n", timeout=60)
    assert json.loads(out.strip().splitlines()[-1]) == {"still_ours": False}
    checkpoint.mark_done(layout, 0)
    committed = [STORE.read_columns(p, ["id"]).column(0).to_pylist() for p in layout.parts_of(0)]
    assert sorted(i for part in committed for i in part) == sorted(r["id"] for r in rows)
    other.release_all()


def test_resumed_shards_come_first_and_a_dead_runs_claim_is_taken_over_at_once(
        tmp_path: Path) -> None:
    """A killed run left shard 2 half done (committed parts, its claim released) and
    shard 1 claimed by a process that is gone from this machine: both are finished before
    fresh shard 0 is started, whatever the claim's TTL."""
    layout, plan = _layout(tmp_path)
    rows = [{"id": "r20", "row_index": 20, "sample_index": 0, "status": "ok"}]
    STORE.write_parquet(layout.new_part(2), pa.Table.from_pylist(rows, schema=output_schema()))
    STORE.write_atomic(layout.claim(1), holder_record(owner="killed-run", pid=dead_pid()))
    claims = ShardClaims(layout, plan, "resumed-run", ttl_s=60)
    assert [claims.claim_next() for _ in range(3)] == [1, 2, 0]
    assert json.loads(STORE.read_bytes(layout.claim(1)))["owner"] == "resumed-run"
    claims.release_all()


def test_after_its_first_listing_a_worker_takes_fresh_shards_before_trying_held_ones(
        tmp_path: Path) -> None:
    """Near a job's end a fleet holds hundreds of live claims, and each try costs two
    requests: a worker that lists again (its order turned out stale) takes the fresh
    shards left before it reads any claim it saw held. Its first listing still tries
    claims first (the test above: a dead run's)."""
    layout, plan = _layout(tmp_path, rows=50)
    store = CountingStorage()
    layout = OutputLayout(layout.root, store)
    STORE.write_atomic(layout.claim(3), holder_record(owner="live", ttl_s=600))
    claims = ShardClaims(layout, plan, "a", ttl_s=600)
    assert claims.claim_next() == 0  # first listing: held 3 tried first, then fresh 0
    assert store.leases_read == ["000003.json"]
    STORE.write_atomic(layout.done_marker(1), json.dumps({"parts": []}).encode())
    store.leases_read.clear()
    assert claims.claim_next() == 2  # 1 found done: a fresh listing, 2 before held 3
    assert store.listed["_claims"] == 2
    assert store.leases_read == []
    assert claims.claim_next() == 4
    assert claims.claim_next() is None and "000003.json" in store.leases_read  # tried last
    claims.release_all()


def test_claims_list_the_store_when_their_order_runs_out_not_per_claim(tmp_path: Path) -> None:
    layout, plan = _layout(tmp_path)
    store = CountingStorage()
    layout = OutputLayout(layout.root, store)
    claims = ShardClaims(layout, plan, "a", ttl_s=60)
    for _ in range(3):
        shard_id = claims.claim_next()
        store.write_atomic(layout.done_marker(shard_id), json.dumps({"parts": []}).encode())
        claims.release(shard_id)
    assert store.listed == {"data": 1, "_claims": 1, "_shards": 1}
    assert claims.claim_next() is None  # the order ran out: one more look, nothing left
    assert store.listed == {"data": 1, "_claims": 2, "_shards": 2}


def test_a_claim_left_unrenewed_for_a_ttl_is_taken_before_the_order_runs_out(
        tmp_path: Path) -> None:
    """Another worker holds shard 2 when this one first tries it; it then stops renewing
    (a lost node). One TTL later this worker takes shard 2 over next, before shard 3 of its
    own order, from a listing of `_claims/` alone; a claim renewed meanwhile is not tried."""
    layout, plan = _layout(tmp_path, rows=50)
    store = CountingStorage()
    layout = OutputLayout(layout.root, store)
    ttl = 0.5
    STORE.write_atomic(layout.claim(0), holder_record(owner="live", ttl_s=600))
    STORE.write_atomic(layout.claim(2), holder_record(owner="lost", ttl_s=ttl))
    claims = ShardClaims(layout, plan, "a", ttl_s=ttl, start_at=1)
    assert claims.claim_next() == 1  # 0 and 2 were held (claims first), then fresh 1
    time.sleep(ttl)
    STORE.write_atomic(layout.claim(0), holder_record(owner="live", ttl_s=600))  # renewed
    time.sleep(ttl)
    store.leases_read.clear()
    assert claims.claim_next() == 2
    assert store.leases_read == ["000002.json"]  # shard 0's live claim is not read
    assert store.listed["_claims"] == 2 and store.listed["_shards"] == 1
    assert json.loads(STORE.read_bytes(layout.claim(2)))["owner"] == "a"
    claims.release_all()
