"""Shard claims: workers take shards one at a time until none are left.

Claiming is dynamic, so a slow node simply takes fewer shards. A claim is a lease
(`tasks/lease.py`) on `_claims/NNNNNN.json`, renewed while the shard is worked on and
renewed once more right before each commit (fencing). A dead worker's claims expire
and its shards are claimed again and resumed from their committed parts.
"""

from __future__ import annotations

from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks import checkpoint
from thinkbatch.tasks.checkpoint import OutputLayout
from thinkbatch.tasks.lease import Lease


class ShardClaims:
    def __init__(self, layout: OutputLayout, plan: Plan, owner: str, ttl_s: float,
                 start_at: int = 0):
        self.layout = layout
        self.plan = plan
        self.owner = owner
        self.ttl_s = ttl_s
        self.start_at = start_at  # workers start at different shards: fewer collisions
        self._held: dict[int, Lease] = {}

    def unfinished(self) -> list[int]:
        done = checkpoint.done_shards(self.layout)
        return [s.shard_id for s in self.plan.shards if s.shard_id not in done]

    def claim_next(self) -> int | None:
        """A shard now held by this worker, or None if every unfinished shard is held
        by a live worker. Free shards are tried before stale claims are examined."""
        n = len(self.plan.shards)
        claimed = {int(name.split(".")[0])
                   for name in self.layout.store.list_files(self.layout.claims, ".json")}
        todo = sorted((s for s in self.unfinished() if s not in self._held),
                      key=lambda s: (s in claimed, (s - self.start_at) % n))
        for shard_id in todo:
            lease = Lease(self.layout.store, self.layout.claim(shard_id), self.ttl_s, self.owner)
            if not lease.try_acquire():
                continue
            if checkpoint.done_stats(self.layout, shard_id) is not None:
                lease.release()  # finished by its last holder just before we looked
                continue
            self._held[shard_id] = lease.keep_renewed()
            return shard_id
        return None

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
