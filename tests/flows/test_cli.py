"""The `thinkbatch` command as a user runs it: a subprocess, Prefect with no server (and
one in-process run, to count what the CLI path does)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import CLI, job_dict, prompt_rows, write_job, write_prompts

KIMI_OUTPUT = "<think>thinking {i}</think>answer {i}"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _replay_job(tmp_path: Path, tiny_model: str) -> Path:
    rows = prompt_rows(40)
    for i, r in enumerate(rows):
        r["raw_text"] = KIMI_OUTPUT.format(i=i)
    rows[7]["raw_text"] = None
    write_prompts(tmp_path / "in.parquet", rows)
    job = job_dict(tmp_path / "in.parquet", tmp_path / "out",
                   {"kind": "replay", "tokenizer": tiny_model},
                   sampling={"temperature": 0.6, "structured_outputs": None},
                   output={"keep_raw_text": True})
    return write_job(tmp_path / "job.yaml", job)


def test_bad_job_file_is_refused_with_every_error_before_any_model_loads(tmp_path: Path) -> None:
    job = job_dict(tmp_path / "missing.parquet", tmp_path / "out",
                   {"model": str(tmp_path / "no-such-model"), "tensor_parallel_size": 8,
                    "decode_context_parallel_size": 3})
    job["parsers"] = {"reasoning": "not_a_parser"}
    r = _run("run", str(write_job(tmp_path / "job.yaml", job)))
    assert r.returncode == 2, r.stderr
    assert "divisible by" in r.stderr
    job["engine"]["decode_context_parallel_size"] = 8
    r = _run("run", str(write_job(tmp_path / "job.yaml", job)))
    assert r.returncode == 2
    assert "input.path" in r.stderr and "not_a_parser" in r.stderr
    assert not (tmp_path / "out").exists()


def test_replay_run_then_changed_sampling_is_refused(tmp_path: Path, tiny_model: str) -> None:
    job = _replay_job(tmp_path, tiny_model)
    r = _run("run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "40 rows written" in r.stdout and "ok=39" in r.stdout and "invalid_input=1" in r.stdout
    r = _run("run", str(job), "--no-progress", "--set", "sampling.temperature=1.0")
    assert r.returncode == 2
    assert "sampling.temperature: 0.6 -> 1.0" in r.stderr
    assert "Traceback" not in r.stderr and "Finished in state" not in r.stderr
    r = _run("run", str(job), "--no-progress", "--set", "sampling.temperature=1.0",
             "--force-resume")
    assert r.returncode == 0, r.stderr


def test_validate_loads_no_model(tmp_path: Path, tiny_model: str) -> None:
    r = _run("validate", str(_replay_job(tmp_path, tiny_model)))
    assert r.returncode == 0 and "is valid" in r.stdout
    assert not (tmp_path / "out").exists()


def test_workers_without_a_prefect_server_are_refused_before_planning(tmp_path: Path,
                                                                      tiny_model: str) -> None:
    job = _replay_job(tmp_path, tiny_model)
    r = _run("run", str(job), "--no-progress", "--set", "scale.workers=2",
             env={"PREFECT_API_URL": ""})
    assert r.returncode == 2
    assert "scale.workers: 2 workers are runs of the deployment" in r.stderr
    assert "PREFECT_API_URL" in r.stderr
    assert not (tmp_path / "out").exists()


def _refused_job(tmp_path: Path, **sections) -> Path:
    """A replay job (no model) over a good first file and a corrupt second one."""
    write_prompts(tmp_path / "in" / "part-0.parquet", prompt_rows(10))
    (tmp_path / "in" / "part-1.parquet").write_bytes(b"PAR1 truncated")
    job = job_dict(tmp_path / "in", tmp_path / "out",
                   {"kind": "replay", "replay_column": "prompt"}, **sections)
    job["sampling"]["structured_outputs"] = None
    job["parsers"] = sections.get("parsers", {})  # parsers of a replay job need a tokenizer
    return write_job(tmp_path / "job.yaml", job)


def test_a_refused_run_prints_its_reasons_and_no_traceback(tmp_path: Path) -> None:
    r = _run("run", str(_refused_job(tmp_path, parsers={"reasoning": "not_a_parser"})),
             "--no-progress")
    assert r.returncode == 2, r.stderr
    output = r.stdout + r.stderr
    assert f"{tmp_path / 'in' / 'part-1.parquet'} is not readable Parquet" in r.stderr
    assert "not_a_parser" in r.stderr
    assert "Traceback" not in output and "Finished in state" not in output, output
    assert not (tmp_path / "out").exists()


def test_validate_reports_schema_and_input_errors_together(tmp_path: Path) -> None:
    r = _run("validate", str(_refused_job(tmp_path, sampling={"temperature": -1})))
    assert r.returncode == 2
    assert "sampling.temperature" in r.stderr
    assert "part-1.parquet is not readable Parquet" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_a_cli_run_checks_and_plans_its_job_once(tmp_path: Path, tiny_model: str,
                                                 prefect_harness, monkeypatch) -> None:
    """In-process: the flow takes the job the CLI checked and planned, and does neither
    again."""
    import signal

    from thinkbatch.flows import cli
    from thinkbatch.tasks import runner
    from thinkbatch.tasks.jobs import validate
    from thinkbatch.tasks.store import plan as plan_module

    calls = {"checked_job": 0, "make_plan": 0}

    def counted(name: str, real):
        def call(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return call

    monkeypatch.setattr(validate, "checked_job", counted("checked_job", validate.checked_job))
    make_plan = counted("make_plan", plan_module.make_plan)
    for module in (plan_module, runner):  # wherever it is looked up
        monkeypatch.setattr(module, "make_plan", make_plan)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main(["run", str(_replay_job(tmp_path, tiny_model)), "--no-progress"]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert calls == {"checked_job": 1, "make_plan": 1}
    assert (tmp_path / "out" / "_manifest.json").exists()
