"""The output folder as the job's durable state: plan, committed parts, done shards,
manifest.

A row is done iff it is in a committed part; a shard is done iff its marker exists.
Resume reads only the `row_index` column of the parts of unfinished shards.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from thinkbatch.schemas.manifest import EngineLayout, Manifest, ShardStats
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.store.fingerprint import describe_changes
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import AlreadyExists, join


MARKER_READERS = 16  # done markers are tiny reads: latency-bound on object stores


class ResumeRefused(RuntimeError):
    """The output folder holds a different job: resuming would mix outputs."""


def open_plan(layout: OutputLayout, plan: Plan, *, force_resume: bool = False) -> tuple[Plan, bool]:
    """Write the plan first; on resume, check the fingerprint. Returns (plan, resumed)."""
    store = layout.store
    try:
        store.write_atomic(layout.plan, plan.model_dump_json(indent=1).encode(), if_absent=True)
        return plan, False
    except AlreadyExists:
        stored = read_plan(layout)
    if not force_resume:
        refuse_changed(layout, stored, plan)
    store.remove_temporaries(layout.data)
    return stored, True


def refuse_changed(layout: OutputLayout, stored: Plan, plan: Plan) -> None:
    """ResumeRefused, naming every changed field, if `plan` is not the stored plan's job."""
    if stored.fingerprint != plan.fingerprint:
        changes = describe_changes(stored.fingerprint_parts, plan.fingerprint_parts)
        raise ResumeRefused(
            f"{layout.root} holds a run of a different job; changed since it started:\n"
            + "\n".join(f"  - {c}" for c in changes)
            + "\nUse another output path, or --force-resume to continue with the old plan.")


KEY = ["row_index", "sample_index"]


def _keys(layout: OutputLayout, part: str) -> list[tuple[int, int]]:
    t = layout.store.read_columns(part, KEY)
    return list(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))


def committed_keys(layout: OutputLayout, shard_id: int) -> set[tuple[int, int]]:
    """(row_index, sample_index) already committed for one shard: only those two columns
    are read, so memory follows shard size."""
    return {k for part in layout.parts_of(shard_id) for k in _keys(layout, part)}


# A rollout part's columns summed into its shard's marker: column -> marker field.
ROLLOUT_SUMS = {"num_turns": "turns", "tool_calls_total": "tool_calls_total",
                "tool_errors": "tool_errors"}


@dataclass(frozen=True)
class PartSummary:
    """What a shard's marker needs of one part: its keys, counts by status and sums.

    The committer makes it from the table it has just written (`of_table`), so marking a
    shard done reads only the parts other processes wrote: with rows of hours a shard is
    committed a few rows at a time, and reading back dozens of small parts (twice) kept
    the writer busy for seconds per shard on S3."""

    keys: list[tuple[int, int]]
    status: Counter[str]
    prompt_tokens: int
    completion_tokens: int
    rollout: dict[str, int]

    @classmethod
    def of_table(cls, t: pa.Table) -> PartSummary:
        names = t.column_names
        return cls(keys=list(zip(t.column("row_index").to_pylist(),
                                 t.column("sample_index").to_pylist())),
                   status=Counter(t.column("status").to_pylist()),
                   prompt_tokens=sum_ints(t.column("prompt_tokens")),
                   completion_tokens=sum_ints(t.column("completion_tokens")),
                   rollout={field: sum_ints(t.column(c))
                            for c, field in ROLLOUT_SUMS.items() if c in names})

    @classmethod
    def read(cls, layout: OutputLayout, part: str) -> PartSummary:
        """One read of the columns it needs (older parts may lack the rollout ones)."""
        file = layout.store.open_parquet(part)
        sums = [c for c in ROLLOUT_SUMS if c in file.schema_arrow.names]
        return cls.of_table(file.read(columns=[*KEY, "status", "prompt_tokens",
                                               "completion_tokens", *sums]))


def _name(part: str) -> str:
    return part.rsplit("/", 1)[-1]


def compact(layout: OutputLayout, shard_id: int, compression: str,
            known: dict[str, PartSummary] | None = None) -> dict[str, PartSummary]:
    """The shard's parts (path -> summary), each row once. Fencing stops a writer that
    lost its claim, but a part can slip in between its last check and its PUT; then the
    shard's rows are rewritten once without duplicates (first copy wins) and the old
    parts removed. `known`: summaries by part name of parts this process wrote."""
    known = known or {}
    parts = {p: known.get(_name(p)) or PartSummary.read(layout, p)
             for p in layout.parts_of(shard_id)}
    flat = [k for summary in parts.values() for k in summary.keys]
    if len(flat) == len(set(flat)):
        return parts
    table = pa.concat_tables(layout.store.open_parquet(p).read() for p in parts)
    seen: set[tuple[int, int]] = set()
    keep = [k for k, i in enumerate(flat) if not (i in seen or seen.add(i))]
    target = layout.new_part(shard_id)
    kept = table.take(keep)
    layout.store.write_parquet(target, kept, compression)
    for p in parts:
        layout.store.delete(p)
    return {target: PartSummary.of_table(kept)}


def shard_stats(parts: dict[str, PartSummary]) -> ShardStats:
    """Counts by status and token totals of a shard's parts; a rollout job's parts add
    their turns, tools run and tool errors."""
    statuses: Counter[str] = Counter()
    rollout: Counter[str] = Counter()
    for summary in parts.values():
        statuses.update(summary.status)
        rollout.update(summary.rollout)
    return ShardStats(rows=sum(len(x.keys) for x in parts.values()), status=dict(statuses),
                      prompt_tokens=sum(x.prompt_tokens for x in parts.values()),
                      completion_tokens=sum(x.completion_tokens for x in parts.values()),
                      **rollout, parts=[_name(p) for p in parts])


def sum_ints(col: pa.Array | pa.ChunkedArray) -> int:
    """A column's sum as an int (0 for an empty or all-null column)."""
    return int(pc.sum(col).as_py() or 0)


def mark_done(layout: OutputLayout, shard_id: int, compression: str = "zstd",
              committed_at: dict[str, float] | None = None,
              engine: EngineLayout | None = None,
              known: dict[str, PartSummary] | None = None) -> ShardStats:
    """The marker lists the parts that hold the shard; any other part of it is an orphan.
    `committed_at` (part name -> Unix time) keeps the commit times of the listed parts,
    `engine` what generated those; `known` the parts this process wrote (PartSummary)."""
    stats = shard_stats(compact(layout, shard_id, compression, known))
    times = {n: committed_at[n] for n in stats.parts if n in (committed_at or {})}
    stats.committed_at = times or None
    stats.engine = engine if times else None
    layout.store.write_atomic(layout.done_marker(shard_id), stats.to_json())
    return stats


def done_stats(layout: OutputLayout, shard_id: int) -> ShardStats | None:
    path = layout.done_marker(shard_id)
    try:
        return ShardStats.model_validate_json(layout.store.read_bytes(path))
    except FileNotFoundError:
        return None


def done_shards(layout: OutputLayout) -> set[int]:
    """One listing, not one read per shard: what claimers and planners need."""
    return {int(n.split(".")[0]) for n in layout.store.list_files(layout.shards, ".json")}


def read_markers(layout: OutputLayout, shard_ids: list[int]) -> dict[int, ShardStats | None]:
    """Every shard's done marker (None where missing), read a few at a time: on S3 each
    is a request, and one after another they would add up to minutes at 100k shards."""
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        return dict(zip(shard_ids, pool.map(lambda s: done_stats(layout, s), shard_ids)))


def sweep_orphans(layout: OutputLayout, markers: dict[int, ShardStats]) -> int:
    """Delete parts of done shards that their markers do not list (a fenced-out writer's).
    One listing of data/ for the whole job, not one per shard."""
    listed = {name for marker in markers.values() for name in marker.parts}
    orphans = [n for n in layout.store.list_files(layout.data, ".parquet")
               if n not in listed and layout.shard_of(n) in markers]
    for name in orphans:
        layout.store.delete(join(layout.data, name))
    return len(orphans)


def read_plan(layout: OutputLayout) -> Plan:
    return Plan.model_validate_json(layout.store.read_bytes(layout.plan))


def write_manifest(layout: OutputLayout, manifest: Manifest) -> None:
    layout.store.write_atomic(layout.manifest, manifest.to_json(indent=2))


def read_manifest(layout: OutputLayout) -> Manifest:
    """FileNotFoundError until the run finished: the manifest is written last."""
    return Manifest.model_validate_json(layout.store.read_bytes(layout.manifest))
