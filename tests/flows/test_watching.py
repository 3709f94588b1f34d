"""A run where its users look: artifacts and events on a real `prefect server start` on
127.0.0.1, read back with Prefect's client; the README's automation created on that
server, firing on a run's events; and a run with no server that leaves the same in its
temporary API's database. Replay jobs (the real path from render to commit, completions
from a column) except for the one that checks TTFT and latency on the real engine."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import (CLI, engine_section, free_port, job_dict, prompt_rows, write_job,
                            write_prompts)
from tests.prefect_server import PrefectServer
from thinkbatch.flows import artifacts, events
from thinkbatch.flows.job import generate_dataset
from thinkbatch.schemas.job_file import load_job
from thinkbatch.schemas.manifest import Manifest, ShardStats
from thinkbatch.tasks.report.summary import figure_rows
from thinkbatch.tasks.rows.listeners import Listener
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "assets" / "tiny-kimi-thinking")
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
        '<|tool_call_argument_begin|>{"city": "paris"}<|tool_call_end|><|tool_calls_section_end|>')


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server-home"))
    yield server
    server.stop()


def _drain() -> None:
    """Send what this process's events and log workers hold; the next ones start afresh
    with the API then configured (each keeps the address it started with)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=30)
    APILogWorker.drain_all(timeout=30)


@pytest.fixture
def on_server(prefect_server: PrefectServer) -> PrefectServer:
    """Flows run in this process report to the server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _drain()
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield prefect_server
        _drain()


def _replay_job(root: Path, name: str, rows: int = 40, bad: int = 0) -> dict[str, Any]:
    """Answers and tool calls by turns; the first `bad` rows have no prompt."""
    data = prompt_rows(rows)
    for i, r in enumerate(data):
        r["raw_text"] = f"<think>thinking {i}</think>" + (CALL if i % 2 else f"answer {i}")
        if i < bad:
            r["prompt"] = None
    write_prompts(root / "in.parquet", data)
    job = job_dict(root / "in.parquet", root / "out", {"kind": "replay", "tokenizer": TOKENIZER},
                   sampling={"structured_outputs": None}, shards={"rows_per_shard": 20})
    return {**job, "name": name}


def _artifacts(server: PrefectServer, key: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with server.client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC)


def _events(server: PrefectServer, prefix: str, resource_id: str | None = None,
            count: int = 1, timeout_s: float = 60) -> list[Any]:
    """At least `count` events named `prefix...` (about `resource_id`), as the server
    has stored them: it persists what it receives in batches."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + timeout_s
    with server.client() as client:
        while True:
            page = client.read_events(filter=EventFilter(
                event=EventNameFilter(prefix=[prefix]),
                resource=EventResourceFilter(id=[resource_id]) if resource_id else None),
                limit=50)
            if len(page.events) >= count or time.monotonic() > deadline:
                return page.events
            time.sleep(1)


def _manifest(out: Path) -> Manifest:
    return Manifest.model_validate_json((out / "_manifest.json").read_text())


def test_a_run_shows_its_figures_progress_summary_and_events(on_server: PrefectServer,
                                                             tmp_path: Path) -> None:
    job = _replay_job(tmp_path, "Watch: Table Test", bad=4)  # 10% invalid_input
    generate_dataset(job)
    out = tmp_path / "out"
    manifest = _manifest(out)
    assert manifest.status_counts == {"invalid_input": 4, "ok": 36}

    (table,) = _artifacts(on_server, "watch-table-test-figures")
    assert table.type == "table"
    rows = json.loads(table.data)
    assert rows == figure_rows(manifest)  # the manifest's figures, cell for cell
    by_figure = {r["figure"]: r for r in rows}
    assert by_figure["rows ok"] == {"figure": "rows ok", "output": 36, "this run": 36}
    assert by_figure["rows invalid_input"]["this run"] == 4
    metrics = manifest.this_run.metrics
    assert by_figure["requests"]["this run"] == metrics.requests == 36
    assert by_figure["requests/s"]["this run"] == round(metrics.requests_per_s, 4) > 0
    assert by_figure["resumed"]["this run"] is False

    (progress,) = _artifacts(on_server, "watch-table-test-progress")
    assert progress.type == "progress" and progress.data == 100

    (summary,) = _artifacts(on_server, "watch-table-test-summary")
    text = summary.data
    assert str(out / "data") in text and str(out / "_manifest.json") in text
    assert str(out / "report" / "report.html") in text
    assert "| invalid_input | 4 | 10.0% |" in text
    for shape in ("**answer**", "**tool calls**", "**failed: invalid_input**"):
        assert shape in text, shape
    assert '"error": "prompt is null or empty"' in text

    resource_id = f"thinkbatch.output.{out}"
    started = _events(on_server, "thinkbatch.job.started", resource_id)
    (finished,) = _events(on_server, "thinkbatch.job.finished", resource_id)
    assert started[0].payload["input_rows"] == 40 and started[0].payload["resumed"] is False
    assert finished.payload["status_counts"] == manifest.status_counts
    assert finished.payload["non_ok"] == 4 and finished.payload["non_ok_share"] == 0.1
    assert finished.resource["thinkbatch.output"] == str(out)
    assert finished.resource["thinkbatch.non-ok-over"] == "5"
    assert finished.payload["report"] == str(out / "report" / "report.html")
    assert any(r.id.startswith("prefect.flow-run.") for r in finished.related)


def test_nightly_runs_add_versions_under_the_same_keys(on_server: PrefectServer,
                                                       tmp_path: Path) -> None:
    for night in ("mon", "tue"):
        generate_dataset(_replay_job(tmp_path / night, "Nightly History", rows=20))
    for what in ("figures", "progress", "summary"):
        history = _artifacts(on_server, f"nightly-history-{what}")
        assert len(history) == 2, what
    newest, oldest = _artifacts(on_server, "nightly-history-summary")
    assert str(tmp_path / "tue") in newest.data and str(tmp_path / "mon") in oldest.data


def test_a_resumed_run_counts_only_its_new_rows(on_server: PrefectServer,
                                                tmp_path: Path) -> None:
    """A finished output run again: nothing new, so this run's figures are empty while the
    output's stay; the progress artifact starts at 100."""
    job = _replay_job(tmp_path, "Resumed Twice", rows=20)
    generate_dataset(job)
    generate_dataset(job)
    manifest = _manifest(tmp_path / "out")
    assert manifest.this_run.resumed is True and manifest.this_run.rows_generated == 0
    assert manifest.this_run.metrics.requests == 0 and manifest.this_run.metrics.status == {}
    newest = json.loads(_artifacts(on_server, "resumed-twice-figures")[0].data)
    assert {r["figure"]: (r["output"], r["this run"]) for r in newest}["rows ok"] == (20, 0)
    assert all(a.data == 100 for a in _artifacts(on_server, "resumed-twice-progress"))


def test_a_failed_job_emits_failed(on_server: PrefectServer, tmp_path: Path) -> None:
    job = _replay_job(tmp_path, "Fails")
    job["engine"]["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(Exception):
        generate_dataset(job)
    (failed,) = _events(on_server, "thinkbatch.job.failed", f"thinkbatch.output.{tmp_path / 'out'}")
    assert "no-such-tokenizer" in failed.payload["error"]
    assert failed.resource["thinkbatch.job"] == "Fails"


def test_the_non_ok_label_is_the_largest_step_passed() -> None:
    shares = (0.0, 0.004, 0.05, 0.0501, 0.3, 1.0)
    assert [events.non_ok_over(s) for s in shares] == ["none", "0", "1", "5", "25", "50"]


def _readme_automation() -> dict[str, Any]:
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# non-ok-alert\.yaml.*?)```", text, re.S)
    return yaml.safe_load(block)


def test_the_readme_automation_fires_past_five_percent_non_ok(on_server: PrefectServer,
                                                               tmp_path: Path) -> None:
    """Created on the server as the README says (its notification swapped for an action
    that needs no block): a clean run does not trigger it, one with 10% bad rows does."""
    from prefect.events.schemas.automations import AutomationCore

    spec = _readme_automation()
    AutomationCore.model_validate(spec)  # as `prefect automation create` reads it
    spec["actions"] = [{"type": "do-nothing"}]
    with on_server.client() as client:
        automation_id = client.create_automation(AutomationCore.model_validate(spec))
    time.sleep(5)  # the server's triggers load new automations on a short loop
    generate_dataset(_replay_job(tmp_path / "clean", "Alert Clean", rows=20))
    _events(on_server, "thinkbatch.job.finished", f"thinkbatch.output.{tmp_path / 'clean' / 'out'}")
    generate_dataset(_replay_job(tmp_path / "bad", "Alert Bad", rows=20, bad=2))
    fired = _events(on_server, "prefect.automation.action.triggered",
                    f"prefect.automation.{automation_id}")
    assert len(fired) == 1
    triggering = [r.id for r in fired[0].related if r.role == "triggering-event"]
    (finished,) = _events(on_server, "thinkbatch.job.finished",
                          f"thinkbatch.output.{tmp_path / 'bad' / 'out'}")
    assert triggering == [f"prefect.event.{finished.id}"]


def test_watching_never_fails_a_job(tmp_path: Path, caplog) -> None:
    """An API that is gone: every artifact and event call logs a warning and returns."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES,
                                  temporary_settings)

    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    spec = load_job(inline=_replay_job(tmp_path, "No API", rows=4))
    layout = OutputLayout(spec.output.path, Storage())
    manifest = Manifest(job=spec.name, rows=0, input_rows=0, status_counts={},
                        prompt_tokens=0, completion_tokens=0, shards=0, fingerprint="f",
                        this_run={}, config={}, versions={}, data=layout.data)
    _drain()
    with temporary_settings({PREFECT_API_URL: dead, PREFECT_CLIENT_MAX_RETRIES: 0}):
        progress = artifacts.ProgressArtifact(spec.name, "progress", "rows",
                                              make_plan(spec, layout.store))
        progress.set(50.0)
        artifacts.publish_results(manifest, layout, {}, None)
        events.finished(spec, layout, manifest, None)
        _drain()
    assert progress.id is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "thinkbatch.artifacts"]
    assert len(warnings) == 3 and all("the job goes on" in w for w in warnings), warnings


def test_the_progress_artifact_follows_the_rows_committed(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener of the pipeline: a shard's parts as they commit, the whole shard once
    done (rows an earlier run committed in it too), each sample a row; its updates at
    most every PROGRESS_EVERY_S, and the last one whatever the time (`finish`)."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES,
                                  temporary_settings)

    spec = load_job(inline=_replay_job(tmp_path, "Follow", rows=40))  # shards of 20 rows
    plan = make_plan(spec, Storage())
    sent: list[float] = []
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact",
                        lambda artifact_id, percent: sent.append(percent))
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api",
                             PREFECT_CLIENT_MAX_RETRIES: 0}):
        progress = artifacts.ProgressArtifact(spec.name, "progress", "rows", plan,
                                              samples=2, done=[0])
    assert isinstance(progress, Listener) and progress.percent() == 50.0
    progress.id = uuid4()  # as if the API had taken it
    monkeypatch.setattr(artifacts, "PROGRESS_EVERY_S", 3600.0)
    progress.committed(1, 10)
    assert (progress.percent(), sent) == (62.5, [])  # within PROGRESS_EVERY_S: not sent
    monkeypatch.setattr(artifacts, "PROGRESS_EVERY_S", 0.0)
    progress.committed(1, 6)
    progress.shard_done(1, ShardStats(rows=40, parts=[]))
    assert sent == [70.0, 100.0]
    progress.finish()
    assert sent == [70.0, 100.0]  # unchanged: nothing sent again


def test_without_a_server_the_cli_run_keeps_its_artifacts_and_events(tmp_path: Path) -> None:
    """`thinkbatch run` with no server: the temporary API takes the artifacts and events,
    into PREFECT_HOME's database; the terminal ends with the seed's table."""
    home = tmp_path / "home"
    job = write_job(tmp_path / "job.yaml", _replay_job(tmp_path, "No Server", bad=4))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([*CLI, "run", str(job), "--no-progress"], capture_output=True, text=True,
                       timeout=600, env={**env, "PREFECT_HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    for figure in ("requests/s", "output tok/s", "TTFT mean (s)", "latency p99 (s)"):
        assert figure in r.stdout, r.stdout
    with sqlite3.connect(home / "prefect.db") as db:
        found = dict(db.execute("select key, data from artifact where key like 'no-server-%'"))
        names = {n for (n,) in db.execute(
            "select event from events where event like 'thinkbatch.%'")}
    assert set(found) == {"no-server-figures", "no-server-progress", "no-server-summary"}
    assert found["no-server-progress"] == 100
    assert str(tmp_path / "out" / "data") in json.loads(found["no-server-summary"])
    assert names == {"thinkbatch.job.started", "thinkbatch.job.finished"}


@pytest.mark.engine
def test_real_engine_ttft_and_latency_match_the_rows(on_server: PrefectServer, tiny_model: str,
                                                     tmp_path: Path) -> None:
    """The seed's table from a vLLM run: the manifest's TTFT and latency against the rows
    written (nearest rank, within a bin), tokens summed, and the table artifact the same."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(60))
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out", engine_section(tiny_model))
    generate_dataset({**job, "name": "Engine Figures"})
    manifest = _manifest(tmp_path / "out")
    data = pq.read_table(tmp_path / "out" / "data").to_pylist()
    metrics = manifest.this_run.metrics
    assert metrics.requests == 60 and metrics.status == {"ok": 60}
    for name in ("ttft_s", "latency_s"):
        values = sorted(r[name] for r in data)
        spread = getattr(metrics, name)
        assert math.isclose(spread.mean, sum(values) / 60, rel_tol=1e-9)
        for q in (50, 90, 99):
            nearest = values[math.ceil(q / 100 * 60) - 1]
            assert math.isclose(getattr(spread, f"p{q}"), nearest, rel_tol=0.006), (name, q)
    reasoning = sum(r["reasoning_tokens"] for r in data)
    assert metrics.reasoning_tokens.total == reasoning > 0
    assert metrics.answer_tokens.total == manifest.completion_tokens - reasoning
    assert metrics.requests_per_s == 60 / manifest.this_run.generation_s
    (table,) = _artifacts(on_server, "engine-figures-figures")
    cells = {r["figure"]: r["this run"] for r in json.loads(table.data)}
    assert cells["TTFT median (s)"] == round(metrics.ttft_s.p50, 4) > 0
    assert cells["latency p99 (s)"] == round(metrics.latency_s.p99, 4)
