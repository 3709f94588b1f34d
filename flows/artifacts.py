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
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.tasks.report import summary
from thinkbatch.tasks.report.progress import Progress
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


class ProgressArtifact:
    """A progress artifact of the flow run, updated as rows finish (at most every
    PROGRESS_EVERY_S) and once more at the end."""

    def __init__(self, job_name: str, what: str, description: str, percent: float = 0.0):
        from prefect.artifacts import create_progress_artifact

        self._percent, self._at = percent, time.monotonic()
        self._latest: Progress | None = None
        self.id: UUID | None = safely(log, "create the progress artifact", create_progress_artifact,
                                       percent, key=artifact_key(job_name, what),
                                       description=description)

    def watch(self, progress: Progress) -> None:
        self._latest = progress
        if time.monotonic() - self._at >= PROGRESS_EVERY_S:
            self.set(progress.percent())

    def finish(self) -> None:
        """The last progress watched, whatever the time since the last update."""
        if self._latest is not None:
            self.set(self._latest.percent())

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
