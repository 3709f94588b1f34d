"""Checks that need the inputs or vLLM's registries: run before any model loads, so a
job that vLLM would refuse after minutes of loading is refused in seconds."""

from __future__ import annotations

import dataclasses

from thinkbatch.schemas.job import JobSpec
from thinkbatch.tasks.storage import Storage, StorageError
from thinkbatch.tasks.render import needed_columns


def check_inputs(job: JobSpec, store: Storage) -> list[str]:
    try:
        files = store.list_inputs(job.input.path)
    except (FileNotFoundError, PermissionError, StorageError) as e:
        return [f"input.path: {e}"]
    try:
        names = set(store.open_parquet(files[0].path).schema_arrow.names)
    except Exception as e:
        return [f"input.path: {files[0].path} is not readable Parquet: {e}"]
    return [f"input: column {c!r} not in {files[0].path} (has: {sorted(names)})"
            for c in needed_columns(job) if c not in names]


def check_vllm(job: JobSpec) -> list[str]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    errors = []
    known = ReasoningParserManager.list_registered()
    if job.parsers.reasoning and job.parsers.reasoning not in known:
        errors.append(f"parsers.reasoning: {job.parsers.reasoning!r} is not a vLLM reasoning "
                      f"parser; known: {', '.join(known)}")
    known = ToolParserManager.list_registered()
    if job.parsers.tool_call and job.parsers.tool_call not in known:
        errors.append(f"parsers.tool_call: {job.parsers.tool_call!r} is not a vLLM tool-call "
                      f"parser; known: {', '.join(known)}")
    engine_args = {f.name for f in dataclasses.fields(EngineArgs)}
    errors += [f"engine.extra_args.{k}: not a vLLM engine argument"
               for k in job.engine.extra_args if k not in engine_args]
    sampling_fields = set(SamplingParams.__struct_fields__)
    errors += [f"sampling.extra.{k}: not a SamplingParams field"
               for k in job.sampling.extra if k not in sampling_fields]
    if job.engine.kind == "replay" and (job.parsers.reasoning or job.parsers.tool_call) \
            and not (job.engine.model or job.engine.tokenizer):
        errors.append("engine: a replay job with parsers needs engine.tokenizer (or model) "
                      "for the parsers' special tokens")
    return errors


def check_output(job: JobSpec, store: Storage) -> list[str]:
    try:
        store.check_output(job.output.path)
    except StorageError as e:
        return [f"output.path: {e}"]
    return []


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


def check_job(job: JobSpec) -> list[str]:
    """Every problem at once."""
    try:
        store = Storage(job.storage)
        storage_errors = check_inputs(job, store) + check_output(job, store)
    except StorageError as e:
        storage_errors = [f"storage: {e}"]
    return storage_errors + check_vllm(job) + check_scale(job)
