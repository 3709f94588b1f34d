"""`thinkbatch report` as a user runs it, and the report every run writes at its end."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CLI, engine_section, job_dict, prompt_rows, write_prompts
from tests.tasks.report.test_charts import CHART_NAMES, CHART_TITLES, write_output
from thinkbatch.flows.job import generate_dataset
from thinkbatch.schemas.manifest import Manifest
from thinkbatch.tasks.report.tally import tally_output
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage

CHART_FILES = {"report.html", *(f"{name}.png" for name in CHART_NAMES)}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())


def _figures(page: str) -> dict[str, str]:
    return dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", page))


def test_report_command_writes_the_page_beside_the_output_or_elsewhere(tmp_path: Path) -> None:
    _, layout, manifest = write_output(tmp_path)

    r = _run("report", layout.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"thinkbatch: report written to {layout.root}/report/report.html"
    assert {p.name for p in (tmp_path / "out" / "report").iterdir()} == CHART_FILES

    r = _run("report", layout.root, "--to", str(tmp_path / "shared" / "nightly"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "shared" / "nightly" / "report.html").read_text()
    assert _figures(page)["completion tokens"].startswith(f"{manifest.completion_tokens:,} ")


def test_report_of_an_unfinished_output_is_refused(tmp_path: Path) -> None:
    r = _run("report", str(tmp_path / "nothing-here"))
    assert r.returncode == 2
    assert "only a finished output has a report" in r.stderr and "Traceback" not in r.stderr


def test_report_command_on_an_s3_output(tmp_path: Path, s3) -> None:
    bucket = s3.bucket("report-cli")
    write_output(tmp_path, out=f"s3://{bucket}/out")

    r = _run("report", f"s3://{bucket}/out")

    assert r.returncode == 0, r.stderr
    assert set(s3.keys(bucket, "out/report/")) == {f"out/report/{n}" for n in CHART_FILES}


@pytest.mark.engine
def test_a_run_writes_its_report_at_the_end(tiny_model: str, prefect_harness,
                                            tmp_path: Path) -> None:
    """A real run on the miniature (random weights: answers and get_weather calls), on
    the engine this process's other tests share."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(24))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model),
                   shards={"rows_per_shard": 8}, output={"flush_rows": 4},
                   sampling={"max_tokens": 96})
    before = datetime.now(timezone.utc)
    generate_dataset(job)

    out = tmp_path / "out"
    manifest = Manifest.model_validate_json((out / "_manifest.json").read_text())
    assert {p.name for p in (out / "report").iterdir()} == CHART_FILES
    page = (out / "report" / "report.html").read_text()
    for title in CHART_TITLES:
        assert f"<h2>{title}</h2>" in page
    figures = _figures(page)
    assert figures["rows"] == "24 (of 24 input rows)"
    assert {k.removeprefix("status "): v for k, v in figures.items() if k.startswith("status ")} \
        == {k: f"{n} ({n / 24:.1%})" for k, n in manifest.status_counts.items()}
    assert figures["prompt tokens"].startswith(f"{manifest.prompt_tokens:,} ")
    assert figures["completion tokens"].startswith(f"{manifest.completion_tokens:,} ")
    assert figures["output tok/s"] == f"{manifest.this_run.output_tokens_per_s:,.1f}"
    ttft = manifest.this_run.metrics.ttft_s  # a first run: its rows are the output's
    assert figures["time to first token"] == (
        f"mean {ttft.mean:,.3f} s, median {ttft.p50:,.3f} s, p90 {ttft.p90:,.3f} s, "
        f"p99 {ttft.p99:,.3f} s")
    tally = tally_output(OutputLayout(str(out), Storage()))
    assert tally.ttft.n == 24 and tally.untimed_parts == 0 and len(tally.commits) >= 6
    # Each row's span in the engine, by the worker that generated it (the flow run).
    rows = pq.read_table(out / "data").to_pylist()
    (worker,) = {r["worker"] for r in rows}
    assert worker and tally.timeline.rows == 24 and list(tally.timeline.busy) == [worker]
    for r in rows:
        span = (r["finished_at"] - r["started_at"]).total_seconds()
        assert span == pytest.approx(r["latency_s"], abs=1e-3) and r["ttft_s"] <= span
        assert before <= r["started_at"] <= r["finished_at"] <= datetime.now(timezone.utc)
    assert set(tally.tools) == {"get_weather"}  # the calls the random weights made
    markers = [json.loads(p.read_text()) for p in (out / "_shards").iterdir()]
    assert all(sorted(m["committed_at"]) == m["parts"] for m in markers)
