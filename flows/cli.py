"""`thinkbatch` command line: run or validate a job file with no Prefect server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from thinkbatch.tasks.vllm_env import prepare_vllm_env

prepare_vllm_env()

from thinkbatch.schemas.job import JobSpec  # noqa: E402
from thinkbatch.schemas.job_file import JobFileError, load_job  # noqa: E402

EXIT_JOB_INVALID = 2
EXIT_JOB_FAILED = 1


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
    tiny = sub.add_parser("tiny-model", help="write the miniature Kimi-K2 model for tests/demo")
    tiny.add_argument("out_dir")
    return parser


def _load_checked(args: argparse.Namespace) -> JobSpec:
    from thinkbatch.tasks.validate import check_job

    job = load_job(args.job, sets=args.sets, preset=args.preset)
    errors = check_job(job)
    if errors:
        raise JobFileError(errors)
    return job


def _show_rows(path: str, n: int) -> str:
    import pyarrow.dataset as ds

    if n <= 0:
        return ""
    cols = ["id", "status", "reasoning", "answer", "tool_calls"]
    rows = ds.dataset(path, format="parquet").head(n, columns=cols).to_pylist()
    return "\n".join("  " + json.dumps(_clip(r), ensure_ascii=False) for r in rows)


def _clip(row: dict[str, Any], width: int = 100) -> dict[str, Any]:
    return {k: (v[:width] + "…" if isinstance(v, str) and len(v) > width else v)
            for k, v in row.items()}


def _configure_logging() -> None:
    log = logging.getLogger("thinkbatch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("THINKBATCH_LOG_LEVEL", "INFO"))
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        from thinkbatch.tasks.tiny_model import write_tiny_model

        print(write_tiny_model(args.out_dir))
        return 0
    try:
        job = _load_checked(args)
    except JobFileError as e:
        print(f"thinkbatch: {e}", file=sys.stderr)
        return EXIT_JOB_INVALID
    if args.command == "validate":
        print(f"thinkbatch: {args.job} is valid")
        return 0
    _configure_logging()
    from thinkbatch.flows.job import generate_dataset
    from thinkbatch.tasks.checkpoint import ResumeRefused
    from thinkbatch.tasks.engine import close_engines
    from thinkbatch.tasks.report import summary

    try:
        manifest = generate_dataset(job.model_dump(mode="json", by_alias=True),
                                    force_resume=args.force_resume,
                                    show_progress=not args.no_progress)
    except ResumeRefused as e:
        print(f"thinkbatch: {e}", file=sys.stderr)
        return EXIT_JOB_INVALID
    except Exception as e:
        print(f"thinkbatch: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    finally:
        close_engines()
    print(summary(manifest))
    print(_show_rows(manifest["data"], args.show_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
