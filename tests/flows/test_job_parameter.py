"""The flows' `job` parameter is a JobSpec: what a deployment, the CLI and the parent flow's
`run_deployment` pass must reach the flow as one, and pass the server's schema check."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.client.schemas.actions import DeploymentFlowRunCreate
from prefect.utilities.schema_tools.validation import validate

from thinkbatch.flows.job import generate_dataset
from thinkbatch.flows.worker import shard_worker
from thinkbatch.schemas.job import JobSpec

# A job file's spelling, aliases included (`samples_per_prompt` for n, `json`).
JOB: dict[str, Any] = {
    "input": {"path": "in.parquet", "prompt_column": "prompt"},
    "engine": {"kind": "vllm", "model": "some/model"},
    "sampling": {"samples_per_prompt": 2, "structured_outputs": {"json": {"type": "object"}}},
    "output": {"path": "out"},
    "scale": {"workers": 2, "shared_filesystem": True},
}


def _server_accepts(flow: Any, parameters: dict[str, Any]) -> None:
    """What a Prefect server with parameter schema enforcement (`prefect deploy`'s
    default) checks a deployment run's parameters against."""
    validate(parameters, flow.parameters.model_dump_for_openapi(), raise_on_error=True)


def test_a_mapping_from_a_deployment_is_validated_into_a_job_spec() -> None:
    _server_accepts(generate_dataset, {"job": JOB})
    job = generate_dataset.validate_parameters({"job": JOB})["job"]
    assert job == JobSpec.model_validate(JOB) and job.sampling.n == 2


def test_a_job_file_path_stays_a_path() -> None:
    """deployments/prefect.yaml's nightly-example passes `job: examples/demo.yaml`."""
    _server_accepts(generate_dataset, {"job": "examples/demo.yaml"})
    assert generate_dataset.validate_parameters({"job": "examples/demo.yaml"})["job"] == \
        "examples/demo.yaml"


def test_a_job_spec_passes_as_it_is() -> None:
    job = JobSpec.model_validate(JOB)
    assert generate_dataset.validate_parameters({"job": job})["job"] is job


def test_the_parent_sends_workers_a_job_spec_they_read_back() -> None:
    """run_deployment serializes a JobSpec by field name (`json_schema`), not by alias."""
    job = JobSpec.model_validate(JOB)
    sent = DeploymentFlowRunCreate(parameters={"job": job, "worker_index": 1}).model_dump(
        mode="json", exclude_unset=True)["parameters"]
    _server_accepts(shard_worker, sent)
    assert shard_worker.validate_parameters(sent) == {"job": job, "worker_index": 1}


def test_an_invalid_job_is_refused_before_the_flow_runs() -> None:
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="engine"):
        shard_worker.validate_parameters({"job": {**JOB, "engine": {"kind": "nope"}}})
