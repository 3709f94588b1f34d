"""What a run shows in the Prefect UI: a table of its figures, its progress and a summary
with sample rows, as artifacts of its flow run.

Keys come from the job's name (`<job>-figures`, `<job>-progress`, `<job>-summary`;
`<job>-progress-worker-<i>` on a scale-out worker), so each nightly run of a job adds a
version to the same artifacts and the UI's Artifacts page shows their history. They go
to the API the flow run uses, the temporary one of `thinkbatch run` included. Watching
is never worth a job: an artifact the API refuses, or an API that is gone, costs a
warning on the log and nothing else.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar
from uuid import UUID

from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.schemas.plan import Plan
from thinkbatch.tasks.report import summary
from thinkbatch.tasks.rows.listeners import Listener
from thinkbatch.tasks.store.layout import OutputLayout

log = logging.getLogger("thinkbatch.artifacts")

PROGRESS_EVERY_S = 5.0  # at most one progress update per this long: a request each
T = TypeVar("T")


def artifact_key(job_name: str, what: str) -> str:
    """Prefect keys take lowercase letters, digits and dashes: the job's name folded."""
    slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-") or "job"
    return f"{slug}-{what}"


def safely(logger: logging.Logger, what: str, call: Callable[..., T], *args: Any,
           **kwargs: Any) -> T | None:
    """`call`, or a warning on `logger` if it raises: artifacts and events are not the job."""
    try:
        return call(*args, **kwargs)
    except Exception as e:  # the API's trouble is no reason to fail a job
        logger.warning("could not %s (the job goes on): %s: %s", what, type(e).__name__, e)
        return None


class ProgressArtifact(Listener):
    """A progress artifact of the flow run: the share of the output's rows committed.

    A listener of the pipeline (the runner adds it to its listeners): a shard's parts as
    they commit, the whole shard once it is done (rows an earlier run committed in it
    included), updated at most every PROGRESS_EVERY_S and once more at the end (`finish`).
    It is told from the pipeline's writer thread. The scale-out parent, which runs no
    pipeline, `set`s it from the done shards instead."""

    def __init__(self, job_name: str, what: str, description: str, plan: Plan,
                 samples: int = 1, done: Collection[int] = ()):
        from prefect.artifacts import create_progress_artifact

        self._rows_of = {s.shard_id: s.num_rows * samples for s in plan.shards}
        self._total = plan.total_rows * samples
        self._done = sum(self._rows_of[i] for i in done)  # rows of the shards done
        self._open: dict[int, int] = {}  # rows committed in shards not yet done
        self._percent, self._at = self.percent(), time.monotonic()
        self.id: UUID | None = safely(log, "create the progress artifact", create_progress_artifact,
                                       self._percent, key=artifact_key(job_name, what),
                                       description=description)

    def percent(self) -> float:
        rows = self._done + sum(self._open.values())
        return min(100.0, 100.0 * rows / self._total) if self._total else 100.0

    def committed(self, shard_id: int, rows: int) -> None:
        self._open[shard_id] = self._open.get(shard_id, 0) + rows
        self._follow()

    def shard_done(self, shard_id: int, stats: ShardStats) -> None:
        self._open.pop(shard_id, None)
        self._done += self._rows_of[shard_id]
        self._follow()

    def _follow(self) -> None:
        if time.monotonic() - self._at >= PROGRESS_EVERY_S:
            self.set(self.percent())

    def finish(self) -> None:
        """The rows committed so far, whatever the time since the last update."""
        self.set(self.percent())

    def set(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        self._at = time.monotonic()
        if self.id is None or percent == self._percent:
            return
        self._percent = percent
        safely(log, "update the progress artifact", update_progress_artifact, self.id, percent)


def publish_results(manifest: Manifest, layout: OutputLayout, markers: dict[int, ShardStats],
                    report_page: str | None) -> None:
    """The figures table and the summary with sample rows, as the run ends."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    safely(log, "create the figures table", create_table_artifact, summary.figure_rows(manifest),
            key=artifact_key(manifest.job, "figures"),
            description=f"{manifest.job}: this run's figures (`{layout.manifest}`)")
    samples = safely(log, "read sample rows", summary.sample_shapes, layout, markers) or {}
    safely(log, "create the summary", create_markdown_artifact,
            summary.markdown_summary(manifest, layout, samples, report_page),
            key=artifact_key(manifest.job, "summary"),
            description=f"{manifest.job}: {manifest.rows:,} rows in {layout.root}")
