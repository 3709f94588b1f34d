"""Shard claims: workers take shards one at a time until none are left.

Claiming is dynamic, so a slow node simply takes fewer shards. A claim is a lease
(`tasks/store/lease.py`) on `_claims/NNNNNN.json`, renewed while the shard is worked on and
renewed once more right before each commit (fencing). A dead worker's claims expire
and its shards are claimed again and resumed from their committed parts.

A claim costs the same at 100 shards as at 100k: each worker keeps its own order of
candidates, from one listing of `_shards/` and `_claims/` (and of `data/` once, at
start), and lists again only when that order runs out or turns out stale. Resumed
shards come first: those with a claim left behind (a dead run's is taken over at once
when its process is gone from this machine's boot and pid namespace, else after its
TTL) or with committed parts, so a killed run's half-done shards are finished before
fresh ones are started.
"""

from __future__ import annotations

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

    def unfinished(self) -> list[int]:
        done = checkpoint.done_shards(self.layout)
        return [s.shard_id for s in self.plan.shards if s.shard_id not in done]

    def _list_candidates(self) -> None:
        """Unfinished shards in claim order: resumed ones, then fresh ones from start_at."""
        store = self.layout.store
        if self._started is None:
            self._started = {s for n in store.list_files(self.layout.data, ".parquet")
                             if (s := self.layout.shard_of(n)) is not None}
        claimed = {int(n.split(".")[0]) for n in store.list_files(self.layout.claims, ".json")}
        resumed = claimed | self._started
        n = len(self.plan.shards)
        todo = [s for s in self.unfinished() if s not in self._held]
        self._order = deque(sorted(todo, key=lambda s: (s not in resumed,
                                                        (s - self.start_at) % n)))

    def claim_next(self) -> int | None:
        """A shard now held by this worker, or None if every unfinished shard is held
        by a live worker. Lists the store at most once per call: when the order has run
        out, or when a candidate was found done (another worker got there first)."""
        listed = False
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
