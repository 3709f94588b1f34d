"""`thinkbatch` command line: run or validate a job file with no Prefect server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError, load_job
from thinkbatch.schemas.manifest import Manifest
from thinkbatch.tasks.process.vllm_env import prepare_vllm_env

EXIT_JOB_INVALID = 2
EXIT_JOB_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT, the same command resumes


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job file (YAML)")
    p.add_argument("--preset", help="preset name from deployments/presets, or a YAML path")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field, e.g. --set engine.max_in_flight=64 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (resumes if its output folder has a run)")
    _job_args(run)
    run.add_argument("--force-resume", action="store_true",
                     help="resume even though the job changed since the output was started")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--show-rows", type=int, default=3, help="rows to print at the end")
    check = sub.add_parser("validate", help="check a job file and its inputs; load no model")
    _job_args(check)
    reparse = sub.add_parser("reparse", help="re-parse a finished output's raw text with "
                                             "other parsers (no model)")
    reparse.add_argument("output", help="a finished output folder (local or s3://)")
    reparse.add_argument("--to", required=True, help="the new output folder")
    reparse.add_argument("--reasoning-parser", help="a vLLM reasoning parser name, or none")
    reparse.add_argument("--tool-call-parser", help="a vLLM tool-call parser name, or none")
    reparse.add_argument("--no-progress", action="store_true", help="no progress bar")
    reparse.add_argument("--show-rows", type=int, default=3, help="rows to print at the end")
    reparse.set_defaults(force_resume=False)
    retry = sub.add_parser("retry", help="regenerate only the rows of a finished output with "
                                         "the given statuses; copy the others")
    retry.add_argument("output", help="a finished output folder (local or s3://)")
    retry.add_argument("--status", required=True, metavar="S1,S2",
                       help="statuses of the rows to regenerate, e.g. truncated,engine_error")
    retry.add_argument("--to", required=True, help="the new output folder")
    retry.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="change a field of the original job, e.g. "
                            "--set sampling.max_tokens=4096 (repeatable)")
    retry.add_argument("--no-progress", action="store_true", help="no progress bar")
    retry.add_argument("--show-rows", type=int, default=3, help="rows to print at the end")
    retry.set_defaults(force_resume=False)
    charts = sub.add_parser("report", help="write a finished output's report: an HTML page "
                                           "with charts, and the charts as PNGs (no model)")
    charts.add_argument("output", help="a finished output folder (local or s3://)")
    charts.add_argument("--to", help="the report's folder (default: OUTPUT/report)")
    return parser




def _configure_logging() -> None:
    log = logging.getLogger("thinkbatch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("THINKBATCH_LOG_LEVEL", "INFO"))
    log.propagate = False


def _run(job: JobSpec, args: argparse.Namespace) -> Manifest:
    _configure_logging()
    from thinkbatch.flows.job import generate_dataset
    from thinkbatch.flows.temporary_api import start_temporary_api
    from thinkbatch.tasks.process import guardian
    from thinkbatch.tasks.rows.engine import close_engines

    guardian.start()  # first: the temporary server and the engine die with this process
    try:
        start_temporary_api()
        return generate_dataset(job, force_resume=args.force_resume,
                                show_progress=not args.no_progress)
    finally:
        close_engines()


def _report(output: str, to: str | None) -> int:
    """Reads the data and the manifest only: no Prefect, no engine."""
    from thinkbatch.tasks.report.html_report import write_report
    from thinkbatch.tasks.store.layout import OutputLayout
    from thinkbatch.tasks.store.storage import Storage

    layout = OutputLayout(output, Storage())
    try:
        if not layout.store.exists(layout.manifest):
            print(f"thinkbatch: {output} has no _manifest.json: only a finished output has a "
                  "report", file=sys.stderr)
            return EXIT_JOB_INVALID
        page = write_report(layout, to)
    except Exception as e:
        print(f"thinkbatch: report failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    print(f"thinkbatch: report written to {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    prepare_vllm_env()  # first: the job checks import vLLM
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before Prefect loads
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args.output, args.to)
    from prefect.exceptions import CancelledRun

    from thinkbatch.flows.checks import checked_job, prepared
    from thinkbatch.tasks import runner
    from thinkbatch.tasks.process.stop import Stopped, raise_on_signals
    from thinkbatch.tasks.store.checkpoint import ResumeRefused
    from thinkbatch.tasks.store.lease import OutputInUse

    raise_on_signals()

    # Every check runs here, before the flow starts: a refusal is a message and exit 2,
    # never a crashed flow run with a traceback. The flow takes the job checked and
    # planned here (tasks/runner.py), so neither happens twice.
    try:
        if args.command == "reparse":
            from thinkbatch.tasks.jobs.reparse import reparse_job

            def load() -> JobSpec:
                return reparse_job(args.output, args.to, args.reasoning_parser,
                                   args.tool_call_parser)
        elif args.command == "retry":
            from thinkbatch.tasks.jobs.retry import retry_job

            def load() -> JobSpec:
                return retry_job(args.output, args.to, args.status.split(","), args.sets)
        else:
            def load() -> JobSpec:
                return load_job(args.job, sets=args.sets, preset=args.preset)
        if args.command == "validate":
            checked_job(load)
            print(f"thinkbatch: {args.job} is valid")
            return 0
        ready = prepared(load, keep=True)
        runner.refuse_early(ready, args.force_resume)
        job = ready.job
        manifest = _run(job, args)
    except (JobFileError, ResumeRefused, OutputInUse) as e:
        print(f"thinkbatch: {e}", file=sys.stderr)
        return EXIT_JOB_INVALID
    except (Stopped, CancelledRun) as e:  # the flow ends a clean stop as Cancelled
        print(f"thinkbatch: {e}, rerun the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:
        print(f"thinkbatch: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    from thinkbatch.tasks.report.summary import sample_rows, summary

    print(summary(manifest))
    for row in sample_rows(job, args.show_rows):
        print("  " + json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
