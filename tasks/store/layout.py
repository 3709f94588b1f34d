"""Where everything of one output lives: its plan, run lease, manifest, data parts, shard
done markers and claims, a rollout's open conversations, a scale-out worker's figures.
Paths only: reading and writing them is the store's (store/checkpoint.py,
store/storage.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from thinkbatch.tasks.store.storage import Storage, join


@dataclass(frozen=True)
class OutputLayout:
    root: str
    store: Storage

    @property
    def plan(self) -> str:
        return join(self.root, "_plan.json")

    @property
    def lease(self) -> str:
        return join(self.root, "_lease.json")

    @property
    def manifest(self) -> str:
        return join(self.root, "_manifest.json")

    @property
    def data(self) -> str:
        return join(self.root, "data")

    @property
    def shards(self) -> str:
        return join(self.root, "_shards")

    @property
    def claims(self) -> str:
        return join(self.root, "_claims")

    def claim(self, shard_id: int) -> str:
        return join(self.claims, f"{shard_id:06d}.json")

    @staticmethod
    def part_prefix(shard_id: int) -> str:
        return f"shard-{shard_id:06d}-"

    @staticmethod
    def shard_of(part_name: str) -> int | None:
        """The shard of a part named `shard-NNNNNN-<uuid>.parquet`; None for other names."""
        head, _, rest = part_name.partition("-")
        return int(rest[:6]) if head == "shard" and rest[:6].isdigit() else None

    def new_part(self, shard_id: int) -> str:
        return join(self.data, f"{self.part_prefix(shard_id)}{uuid.uuid4().hex[:12]}.parquet")

    def parts_of(self, shard_id: int) -> list[str]:
        """One prefix listing: on S3 one request whatever the output's size."""
        return [join(self.data, n) for n in self.store.list_files(
            self.data, ".parquet", prefix=self.part_prefix(shard_id))]

    def all_parts(self) -> list[str]:
        return [join(self.data, n) for n in self.store.list_files(self.data, ".parquet")]

    def done_marker(self, shard_id: int) -> str:
        return join(self.shards, f"{shard_id:06d}.json")

    def open_conversations(self, shard_id: int) -> str:
        """A shard's open rollout conversations (store/open_conversations.py): one folder
        per shard, so finding them is one prefix listing."""
        return join(self.root, "_open", f"{shard_id:06d}")

    def open_conversation(self, shard_id: int, row_index: int, sample: int) -> str:
        return join(self.open_conversations(shard_id), f"{row_index}-{sample}.json")

    def worker_figures(self, flow_run_id: str) -> str:
        """A scale-out worker's figures (`WorkerFigures`), until the parent finalizes."""
        return join(self.root, "_workers", f"{flow_run_id}.json")

    def worker_heartbeat(self, flow_run_id: str) -> str:
        """A scale-out worker's heartbeat (store/heartbeat.py), while it runs."""
        return join(self.root, "_workers", f"{flow_run_id}.alive.json")
