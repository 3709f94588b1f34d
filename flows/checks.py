"""The job's checks as the CLI and the flows run them, before any model loads: those of
tasks/jobs/validate.py (the job, its inputs and output, vLLM's registries), plus the one that
asks the Prefect server, which is why it lives here and not in the Prefect-free tasks/."""

from __future__ import annotations

from collections.abc import Callable

from thinkbatch.schemas.job import JobSpec
from thinkbatch.tasks import runner
from thinkbatch.tasks.jobs import validate
from thinkbatch.tasks.report.metrics import check_metrics_port


def check_scale(job: JobSpec) -> list[str]:
    """K workers are runs of a deployment, so they need a Prefect server that has it;
    without this check the job would fail only after planning, at the first start."""
    if job.scale.workers == 1:
        return []
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    name, url = job.scale.worker_deployment, PREFECT_API_URL.value()
    if not url:
        return [f"scale.workers: {job.scale.workers} workers are runs of the deployment "
                f"{name!r} and need a Prefect server: set PREFECT_API_URL to one where "
                "deployments/prefect.yaml is deployed, or use scale.workers: 1"]
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        return [f"scale.worker_deployment: {name!r} is not deployed on {url} "
                "(`prefect deploy --all` in deployments/ deploys it)"]
    except Exception as e:
        return [f"scale.workers: cannot reach the Prefect server at {url}: {type(e).__name__}: {e}"]
    return []


# The checks of the caller, each with the job sections it reads (skipped when one failed).
MORE = ((check_scale, ("scale",)), (check_metrics_port, ("observability", "scale")))


def checked_job(load: Callable[[], JobSpec]) -> JobSpec:
    """The job `load` reads, or one JobFileError with every problem, the server's and the
    metrics port's too (`thinkbatch validate`)."""
    return validate.checked_job(load, more=MORE)


def prepared(load: Callable[[], JobSpec], keep: bool = False) -> runner.Ready:
    """The job checked as `checked_job` checks it, and planned (tasks/runner.py); `keep`:
    for the flow this process runs next."""
    return runner.prepare(load, more=MORE, keep=keep)
