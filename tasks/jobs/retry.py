"""Retrying only the failed rows of a finished output.

A retry is an ordinary job: the source's config from its manifest, `--set` on top, a new
output path and a `retry` section, so the fingerprint covers it and a killed retry resumes
like any run. Its plan is the source's (same inputs, same shards). Per shard, the rows whose
source status is not retried are committed as they are, as one part through the run's
committer; the feeder then generates only the keys that part does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError, resolve_raw, validate_job
from thinkbatch.schemas.manifest import Manifest, RetrySummary
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.checkpoint import KEY
from thinkbatch.tasks.store.fingerprint import describe_changes
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage, StorageError, join

if TYPE_CHECKING:
    from thinkbatch.tasks.store.commit import Committer

Key = tuple[int, int]

# What makes a row the same row: a retry may change anything but these.
FIXED = ("input.id_column", "input.sample_index_column", "input.passthrough_columns",
         "shards.rows_per_shard", "sampling.n")


def source_manifest(layout: OutputLayout) -> Manifest:
    try:
        return checkpoint.read_manifest(layout)
    except FileNotFoundError:
        raise JobFileError([f"{layout.root} has no _manifest.json: only a finished output "
                            "can be retried"]) from None


def retry_job(source: str, target: str, statuses: Sequence[str],
              sets: Sequence[str] = ()) -> JobSpec:
    """The job `thinkbatch retry` runs (check_retry says whether it may). The manifest's
    config holds the values a preset gave, so no preset is merged again."""
    config = source_manifest(OutputLayout(source, Storage())).config
    preset = config.pop("preset", None)
    data = resolve_raw(config, sets)
    data["output"]["path"] = target
    data.update(preset=preset, retry={"source": source,
                                      "statuses": [s.strip() for s in statuses if s.strip()]})
    return validate_job(data)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    return reduce(lambda node, key: node.get(key), dotted.split("."), tree)


def check_retry(job: JobSpec) -> list[str]:
    """A retry keeps the source's rows, so it must see the same rows: the same input files
    cut into the same shards, with the same ids, samples and passthrough columns."""
    if job.retry is None:
        return []
    source = OutputLayout(job.retry.source, Storage(job.storage))
    if source.root.rstrip("/") == job.output.path.rstrip("/"):
        return ["output.path: a retry writes a new output, not its source"]
    try:
        config = source_manifest(source).config
    except JobFileError as e:
        return [f"retry.source: {e.errors[0]}"]
    now = job.model_dump(mode="json")
    errors = [f"{key}: {_get(config, key)!r} -> {_get(now, key)!r}; a retry keeps the "
              f"source's rows, so it keeps their {key}"
              for key in FIXED if _get(config, key) != _get(now, key)]
    try:
        listed = source.store.list_inputs(job.input.path)
    except (FileNotFoundError, StorageError):
        return errors  # check_inputs names it
    stored = checkpoint.read_plan(source).files
    if [(f.path, f.size, f.version) for f in listed] != [(f.path, f.size, f.version)
                                                           for f in stored]:
        errors.append(f"input.path: the input files changed since {source.root} was written "
                      "(size, mtime or ETag); a retry needs the rows its source was made from")
    return errors


def manifest_section(job: JobSpec, plan: Plan) -> RetrySummary:
    """The manifest's account of the retry."""
    assert job.retry is not None
    source = OutputLayout(job.retry.source, Storage(job.storage))
    counts = source_manifest(source).status_counts
    statuses = [s.value for s in job.retry.statuses]
    return RetrySummary(source=job.retry.source, statuses=statuses,
                        rows_retried=sum(counts.get(s, 0) for s in statuses),
                        changes=describe_changes(
                            _job_parts(checkpoint.read_plan(source).fingerprint_parts),
                            _job_parts(plan.fingerprint_parts)))


def _job_parts(parts: dict[str, str]) -> dict[str, str]:
    """Fingerprint parts but the retry section: what differs from the source's job."""
    return {k: v for k, v in parts.items() if k.split(".")[0] != "retry"}


class Carry:
    """Answers, per shard, which keys a retry keeps from its source, and commits their
    rows. Only the shard's own parts are read (those its done marker lists)."""

    def __init__(self, job: JobSpec, schema: pa.Schema):
        assert job.retry is not None
        self.source = OutputLayout(job.retry.source, Storage(job.storage))
        self.retried = pa.array([s.value for s in job.retry.statuses], pa.string())
        self.schema = schema

    def _parts(self, shard_id: int) -> list[str]:
        marker = checkpoint.done_stats(self.source, shard_id)
        if marker is None:
            raise RuntimeError(f"{self.source.root}: shard {shard_id} has no done marker")
        return [join(self.source.data, name) for name in marker.parts]

    def _read_kept(self, parts: list[str], columns: list[str]) -> pa.Table:
        table = pa.concat_tables(self.source.store.read_columns(p, columns) for p in parts)
        return table.filter(pc.invert(pc.is_in(table.column("status"), self.retried)))

    def _kept_rows(self, parts: list[str]) -> pa.Table:
        """In this version's schema: a column added since the source was written is null."""
        have = set(self.source.store.open_parquet(parts[0]).schema_arrow.names)
        table = self._read_kept(parts, [n for n in self.schema.names if n in have])
        return pa.Table.from_arrays(
            [table.column(f.name) if f.name in have else pa.nulls(table.num_rows, f.type)
             for f in self.schema], names=self.schema.names).cast(self.schema)

    def keep(self, shard_id: int, done: set[Key], committer: Committer) -> tuple[set[Key], int]:
        """The keys kept from the source, and how many rows this call copied. Their rows
        go into one part, so an earlier run of this retry committed all of them or none:
        commit them unless it did."""
        parts = self._parts(shard_id)
        keys = self._read_kept(parts, [*KEY, "status"])
        kept = set(zip(keys.column(KEY[0]).to_pylist(), keys.column(KEY[1]).to_pylist()))
        if kept and kept.isdisjoint(done):
            rows = self._kept_rows(parts)
            committer.add_part(shard_id, rows)
            return kept, rows.num_rows
        return kept, 0
