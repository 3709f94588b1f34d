"""Shard claims: workers take shards one at a time until none are left.

Claiming is dynamic, so a slow node simply takes fewer shards. A claim is a lease
(`tasks/store/lease.py`) on `_claims/NNNNNN.json`, renewed while the shard is worked on and
renewed once more right before each commit (fencing). A dead worker's claims expire
and its shards are claimed again and resumed from their committed parts.

A claim costs the same at 100 shards as at 100k: each worker keeps its own order of
candidates, from one listing of `_shards/` and `_claims/` (and of `data/` once, at
start), and lists again only when that order runs out or turns out stale. At its first
listing a worker tries resumed shards first: those with a claim left behind (a dead
run's is taken over at once when its process is gone from this machine's boot and pid
namespace, else after its TTL) or with committed parts, so a killed run's half-done
shards are finished before fresh ones are started. At later listings a claim it sees is
most likely a live worker's: claimed shards go last, after the fresh ones. Each try of
a live claim costs two requests, and a fleet holds hundreds: a node that runs dry near a
job's end would try them all before the fresh shards still left (in the simulated fleet,
simulated hours of an idle engine).

A worker also lists `_claims/` alone (in-progress shards only: a short listing at any
job size) at most once per claim TTL while it claims. A claim listed at the same version
(ETag) as at the worker's previous look was not renewed for a TTL, which a live holder
does every TTL/4: its holder is dead or stalled, and the claim is tried first. So a node
lost mid-run leaves its half-done shards to the live nodes' next claims, a TTL or two
later, not to the end of their orders or to a replacement that loads for 20 minutes;
and a live holder's claims cost nothing to skip.
"""

from __future__ import annotations

import time
from collections import deque

from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.lease import Lease


class ShardClaims:
    def __init__(self, layout: OutputLayout, plan: Plan, owner: str, ttl_s: float,
                 start_at: int = 0):
        self.layout = layout
        self.plan = plan
        self.owner = owner
        self.ttl_s = ttl_s
        self.start_at = start_at  # workers start at different shards: fewer collisions
        self._held: dict[int, Lease] = {}
        self._order: deque[int] = deque()  # candidates not tried since the last listing
        self._started: set[int] | None = None  # shards with committed parts, listed at start
        self._looked = time.monotonic()  # when `_claims/` was last listed,
        self._seen: dict[int, str] = {}  # and each claim's version then

    def unfinished(self) -> list[int]:
        done = checkpoint.done_shards(self.layout)
        return [s.shard_id for s in self.plan.shards if s.shard_id not in done]

    def _list_candidates(self) -> None:
        """Unfinished shards in claim order (module docstring), each rank from start_at."""
        store = self.layout.store
        first = self._started is None
        if first:
            self._started = {s for n in store.list_files(self.layout.data, ".parquet")
                             if (s := self.layout.shard_of(n)) is not None}
        self._seen = self._list_claims()
        claimed = self._seen.keys()
        n = len(self.plan.shards)

        def rank(s: int) -> int:
            if first:
                return 0 if s in claimed or s in self._started else 1
            return 2 if s in claimed else 0 if s in self._started else 1

        todo = [s for s in self.unfinished() if s not in self._held]
        self._order = deque(sorted(todo, key=lambda s: (rank(s), (s - self.start_at) % n)))

    def _list_claims(self) -> dict[int, str]:
        """Every claim now: shard -> its version."""
        self._looked = time.monotonic()
        return {int(n.split(".")[0]): v for n, v in
                self.layout.store.list_versions(self.layout.claims, ".json").items()}

    def _claims_left_behind_first(self) -> None:
        """Claims not renewed since the last look (module docstring) go to the front of
        the order, whether or not this worker tried them before."""
        now = self._list_claims()
        stale = sorted(s for s, v in now.items() if self._seen.get(s) == v
                       and s not in self._held)
        self._seen = now
        if stale:
            self._order = deque([*stale, *(s for s in self._order if s not in stale)])

    def claim_next(self) -> int | None:
        """A shard now held by this worker, or None if every unfinished shard is held
        by a live worker. Lists the store at most once per call: when the order has run
        out, or when a candidate was found done (another worker got there first)."""
        listed = False
        if self._order and time.monotonic() - self._looked >= self.ttl_s:
            self._claims_left_behind_first()
        while True:
            if not self._order:
                if listed:
                    return None
                self._list_candidates()
                listed = True
                continue
            shard_id = self._order.popleft()
            lease = Lease(self.layout.store, self.layout.claim(shard_id), self.ttl_s, self.owner)
            if not lease.try_acquire():
                continue  # a live holder's: tried again after the next listing
            if checkpoint.done_stats(self.layout, shard_id) is not None:
                lease.release()  # done since we listed: the rest of the order may be too
                if not listed:
                    self._order.clear()
                continue
            self._held[shard_id] = lease.keep_renewed()
            return shard_id

    def still_ours(self, shard_id: int) -> bool:
        """Renew now: True only if nobody took the claim over since our last renewal."""
        lease = self._held.get(shard_id)
        return lease is not None and lease.renew()

    def release(self, shard_id: int) -> None:
        lease = self._held.pop(shard_id, None)
        if lease is not None:
            lease.release()

    def release_all(self) -> None:
        for shard_id in list(self._held):
            self.release(shard_id)
