"""Jobs that read from and write to S3, against a real S3 endpoint on 127.0.0.1 (moto's
server mode): the same guarantees as on local disk."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import (CLI, ENGINE_IN_PROCESS, engine_section, job_dict,
                            kill_after_first_commit, prompt_rows, write_job)
from thinkbatch.flows.job import generate_dataset
from thinkbatch.tasks.store.lease import acquire_run_lease
from thinkbatch.tasks.store.storage import Storage

SECRET = "s3cr3t-never-printed"


def _put_prompts(s3, bucket: str, sizes: tuple[int, ...]) -> list[str]:
    ids = []
    for k, n in enumerate(sizes):
        rows = prompt_rows(n, start=10_000 * k)
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=200)
        s3.client().put_object(Bucket=bucket, Key=f"prompts/part-{k}.parquet",
                               Body=sink.getvalue())
        ids += [r["id"] for r in rows]
    return ids


def _output(s3, bucket: str, prefix: str = "out") -> pa.Table:
    fs = pafs.S3FileSystem(endpoint_override=f"{s3.host}:{s3.port}", scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return pq.read_table(f"{bucket}/{prefix}/data", filesystem=fs)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENGINE_IN_PROCESS, **(env or {})})


@pytest.mark.engine
def test_s3_job_killed_after_a_commit_resumes_exactly_once(s3, tiny_model: str,
                                                           tmp_path: Path) -> None:
    bucket = s3.bucket("e2e")
    ids = _put_prompts(s3, bucket, (240, 180, 210))  # shards that span files and row groups
    job = write_job(tmp_path / "job.yaml", job_dict(
        f"s3://{bucket}/prompts/", f"s3://{bucket}/out", engine_section(tiny_model),  # type: ignore[arg-type]
        shards={"rows_per_shard": 150}, output={"flush_rows": 40},
        sampling={"max_tokens": 64, "structured_outputs": {"regex": "<think>[a-z]{1,6}</think>answer [a-z]{1,6}"}}))
    env = {"AWS_SECRET_ACCESS_KEY": SECRET}
    kill_after_first_commit(job, env)
    committed = _output(s3, bucket)
    assert 0 < committed.num_rows < len(ids)

    r = _cli("run", str(job), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    table = _output(s3, bucket)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)  # every id exactly once
    assert set(table.column("status").to_pylist()) == {"ok"}
    keys = s3.keys(bucket, "out/")
    assert {k.split("/")[1] for k in keys} == {"_plan.json", "_manifest.json", "_shards", "data",
                                               "report"}
    assert all(k.endswith(".parquet") for k in keys if k.startswith("out/data/"))
    manifest = s3.client().get_object(Bucket=bucket, Key="out/_manifest.json")["Body"].read()
    for text in (r.stdout, r.stderr, manifest.decode()):
        assert SECRET not in text


@pytest.mark.engine
def test_endpoint_down_for_seconds_mid_run_loses_nothing(s3, tiny_model: str, prefect_harness,
                                                         tmp_path: Path) -> None:
    bucket = s3.bucket("outage")
    ids = _put_prompts(s3, bucket, (300,))
    job = job_dict(f"s3://{bucket}/prompts/", f"s3://{bucket}/out", engine_section(tiny_model),  # type: ignore[arg-type]
                   output={"flush_rows": 16})

    down_at: list[float] = []

    def outage() -> None:
        while not any("/data/" in k for k in s3.keys(bucket, "out/")):
            time.sleep(0.05)
        s3.stop()
        down_at.append(time.monotonic())
        time.sleep(3)
        s3.start_again()

    breaker = threading.Thread(target=outage)
    breaker.start()
    manifest = generate_dataset(job)
    finished_at = time.monotonic()
    breaker.join()
    assert down_at and down_at[0] + 3 < finished_at  # the run lived through the outage
    assert manifest.rows == len(ids)
    assert sorted(_output(s3, bucket).column("id").to_pylist()) == sorted(ids)


def test_second_run_on_the_same_output_is_refused(s3, tiny_model: str, tmp_path: Path) -> None:
    bucket = s3.bucket("two-runs")
    _put_prompts(s3, bucket, (20,))
    job = write_job(tmp_path / "job.yaml", job_dict(
        f"s3://{bucket}/prompts/", f"s3://{bucket}/out",  # type: ignore[arg-type]
        engine_section(str(tmp_path / "never-loaded"))))
    first = acquire_run_lease(Storage(), f"s3://{bucket}/out/_lease.json")
    r = _cli("run", str(job), "--no-progress")
    first.release()
    assert r.returncode == 2, r.stderr
    assert f"held by run {first.owner}" in r.stderr and "another run is writing" in r.stderr


def test_wrong_bucket_and_missing_credentials_stop_before_the_model(s3, tmp_path: Path) -> None:
    bucket = s3.bucket("exists")
    _put_prompts(s3, bucket, (5,))
    never = engine_section(str(tmp_path / "never-loaded"))
    job = write_job(tmp_path / "a.yaml", job_dict(f"s3://{bucket}/prompts/",
                                                  "s3://no-such-bucket/out", never))  # type: ignore[arg-type]
    r = _cli("run", str(job), "--no-progress")
    assert r.returncode == 2
    assert "output.path" in r.stderr and "'no-such-bucket'" in r.stderr and "NoSuchBucket" in r.stderr

    job = write_job(tmp_path / "b.yaml", job_dict(f"s3://{bucket}/prompts/",
                                                  f"s3://{bucket}/out", never))  # type: ignore[arg-type]
    no_creds = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    r = _cli("run", str(job), "--no-progress", env=no_creds)
    assert r.returncode == 2
    assert "no AWS credentials" in r.stderr and f"'{bucket}'" in r.stderr
