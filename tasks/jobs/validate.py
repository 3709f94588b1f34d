"""Checks beyond the job's own schema (every input file, the output path, vLLM's
registries): run before any model loads, so a job that would fail after minutes of
loading, or mid-run, is refused in seconds with every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.parquet as pq

from thinkbatch.schemas.job import EngineSpec, JobSpec
from thinkbatch.schemas.job_file import JobFileError
from thinkbatch.schemas.output import BASE_NAMES, ROLLOUT_NAMES
from thinkbatch.schemas.tools import tool_errors
from thinkbatch.tasks.jobs.retry import check_retry
from thinkbatch.tasks.rows.engine_settings import seeded_sampling_errors
from thinkbatch.tasks.rows.render import needed_columns, template_errors
from thinkbatch.tasks.rows.sampling import job_sampling_errors
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import read_footers
from thinkbatch.tasks.store.storage import Storage, StorageError, is_s3


# A prompt may be binary (decoded as UTF-8); a replayed completion is text.
PROMPT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
TEXT_TYPES = (pa.string(), pa.large_string())
FILES_NAMED = 3  # files named in one error; the rest are counted
_GLOB_CHARS = "*?["


def _files(paths: list[str]) -> str:
    more = len(paths) - FILES_NAMED
    return ", ".join(paths[:FILES_NAMED]) + (f" and {more} more files" if more > 0 else "")


def check_inputs(job: JobSpec, store: Storage) -> list[str]:
    """Every input file (every footer, read in parallel once per run) readable Parquet
    with every needed column, each of one type in all files: a bad later file would
    otherwise fail the job mid-run."""
    try:
        files = store.list_inputs(job.input.path)
    except (FileNotFoundError, PermissionError, StorageError) as e:
        return [f"input.path: {e}"]
    footers = read_footers(store, files)
    errors = [f"input.path: {f.path} is not readable Parquet: {footer}"
              for f, footer in zip(files, footers) if isinstance(footer, Exception)]
    schemas = {f.path: footer.schema for f, footer in zip(files, footers)
               if not isinstance(footer, Exception)}
    for column in needed_columns(job):
        errors += _column_errors(job, column, schemas)
    return errors


def _column_errors(job: JobSpec, column: str, schemas: dict[str, pa.Schema]) -> list[str]:
    missing = [path for path, schema in schemas.items() if schema.get_field_index(column) < 0]
    errors = []
    if missing:
        errors.append(f"input: column {column!r} is missing from {_files(missing)} "
                      f"(it has: {schemas[missing[0]].names})")
    lacking = set(missing)
    typed = [(path, schema.field(column).type) for path, schema in schemas.items()
             if path not in lacking]
    text = _text_types(job, column)
    if column == job.input.id_column:
        errors += _not_scalar(column, typed)
    return errors + (_not_text(column, typed, *text) if text else _mixed(job, column, typed))


def _text_types(job: JobSpec, column: str) -> tuple[tuple[pa.DataType, ...], str] | None:
    if column == job.input.prompt_column:
        return PROMPT_TYPES, "a prompt column"
    if job.engine.kind == "replay" and column == job.engine.replay_column:
        return TEXT_TYPES, "a replay column"
    return None


def _not_text(column: str, typed: list[tuple[str, pa.DataType]],
              allowed: tuple[pa.DataType, ...], what: str) -> list[str]:
    by_type: dict[pa.DataType, list[str]] = {}
    for path, kind in typed:
        if kind not in allowed and not pa.types.is_null(kind):
            by_type.setdefault(kind, []).append(path)
    names = "/".join(str(t) for t in allowed)
    return [f"input: column {column!r} is {kind} in {_files(paths)}; {what} must be {names}"
            for kind, paths in by_type.items()]


def _not_scalar(column: str, typed: list[tuple[str, pa.DataType]]) -> list[str]:
    """A row id is read as text (tasks/rows/read.py casts it); a type that Arrow cannot cast to
    text (a list, a struct) would fail the run at its first batch. Found by casting."""
    by_type: dict[pa.DataType, list[str]] = {}
    for path, kind in typed:
        try:
            pa.array([], kind).cast(pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            by_type.setdefault(kind, []).append(path)
    return [f"input: column {column!r} is {kind} in {_files(paths)}; an id column must be "
            "a scalar that reads as text (string, integer, ...)"
            for kind, paths in by_type.items()]


def _mixed(job: JobSpec, column: str, typed: list[tuple[str, pa.DataType]]) -> list[str]:
    """A passthrough column is written with the first file's type; an all-null (null
    typed) column of a later file fits any type."""
    if not typed:
        return []
    passthrough = column in job.input.passthrough_columns
    first_path, first = next(((p, t) for p, t in typed
                              if passthrough or not pa.types.is_null(t)), typed[0])
    by_type: dict[pa.DataType, list[str]] = {}
    for path, kind in typed:
        if kind != first and not pa.types.is_null(kind):
            by_type.setdefault(kind, []).append(path)
    why = ("a passthrough column keeps the first file's type" if passthrough
           else "a column has one type in all files")
    return [f"input: column {column!r} is {kind} in {_files(paths)} but {first} in "
            f"{first_path}; {why}" for kind, paths in by_type.items()]


def check_vllm(job: JobSpec) -> list[str]:
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
    errors += [_not_an_engine_arg(k, engine_args) for k in job.engine.vllm_args
               if k not in engine_args]
    errors += job_sampling_errors(job)
    if job.engine.kind == "replay" and (job.parsers.reasoning or job.parsers.tool_call) \
            and not (job.engine.model or job.engine.tokenizer):
        errors.append("engine: a replay job with parsers needs engine.tokenizer (or model) "
                      "for the parsers' special tokens")
    return errors


def _not_an_engine_arg(key: str, engine_args: set[str]) -> str:
    """A key under `engine:` that is neither thinkbatch's field nor vLLM's argument: a typo
    of either, named with the closest name of both."""
    close = difflib.get_close_matches(key, [*EngineSpec.model_fields, *engine_args], n=1)
    hint = f"; did you mean engine.{close[0]}?" if close else ""
    return (f"engine.{key}: not a vLLM engine argument, nor a field of thinkbatch's engine "
            f"section{hint}")


def check_output(job: JobSpec, store: Storage) -> list[str]:
    try:
        store.check_output(job.output.path)
    except StorageError as e:
        return [f"output.path: {e}"]
    return []


def check_output_outside_input(job: JobSpec, store: Storage) -> list[str]:
    """Output parts the input listing would pick up change the inputs of the next run
    (a resume is refused, or reads its own outputs as prompts)."""
    part = OutputLayout(job.output.path, store).new_part(0)
    if not _listed(job.input.path, part):
        return []
    return [f"output.path: {job.output.path!r} lies inside the input path "
            f"{job.input.path!r}: its Parquet parts would be read as inputs"]


def _listed(spec: str, path: str) -> bool:
    """Whether Storage.list_inputs(spec) would list the file `path`, were it there: a
    folder or prefix lists everything under it, a glob what it matches."""
    if is_s3(spec) != is_s3(path):
        return False
    if not is_s3(spec):
        spec, path = os.path.realpath(spec), os.path.realpath(path)
    cut = min((spec.find(c) for c in _GLOB_CHARS if c in spec), default=-1)
    if cut < 0:
        return path.startswith(spec.rstrip("/") + "/")
    if is_s3(spec):
        return fnmatch.fnmatchcase(path, spec)
    if "**" in spec:  # recursive: anything under the glob's fixed folder may match
        return path.startswith(spec[:cut].rsplit("/", 1)[0] + "/")
    return PurePath(path).match(spec)


def check_output_shared(job: JobSpec) -> list[str]:
    """Workers read the plan and commit parts where the parent wrote them: a local path
    on the parent's host is, on another host, an empty folder of its own (the worker
    fails reading the plan, after its model loaded). Only the user knows whether every
    worker host mounts it."""
    if job.scale.workers == 1 or is_s3(job.output.path) or job.scale.shared_filesystem:
        return []
    return [f"output.path: {job.output.path!r} is a local folder and scale.workers is "
            f"{job.scale.workers}: workers on other hosts would not see it. Use an s3:// "
            "output, or set scale.shared_filesystem: true if every worker runs on this "
            "host or mounts this folder (a filesystem with atomic mkdir and rename)"]


def check_compression(job: JobSpec) -> list[str]:
    """What pyarrow can write, found by writing: an unknown codec would otherwise fail
    the first commit, after the model loaded."""
    try:
        pq.write_table(pa.table({"x": pa.array([], pa.int8())}), io.BytesIO(),
                       compression=job.output.compression)
    except (OSError, ValueError, pa.ArrowException) as e:
        return [f"output.compression: {job.output.compression!r} is not a Parquet "
                f"compression pyarrow can write ({e}); e.g. zstd, snappy, gzip, lz4, none"]
    return []


def check_passthrough(job: JobSpec) -> list[str]:
    names = BASE_NAMES | (ROLLOUT_NAMES if job.rollout else frozenset())
    clash = [c for c in job.input.passthrough_columns if c in names]
    if not clash:
        return []
    return [f"input.passthrough_columns: {clash} are also output columns; an output row "
            "cannot hold both"]


def check_tools(job: JobSpec) -> list[str]:
    return tool_errors(job.tools, "tools") if job.tools is not None else []


def check_rollout(job: JobSpec) -> list[str]:
    """A rollout runs the model's parsed tool calls on a generating engine; its tools
    must start now (a tool source that cannot is refused before the model loads), and
    their names must not repeat the job's `tools` (those describe recorded tools). A run
    in this process takes the toolbox opened here (tools/kept.py), so its MCP servers
    start once; workers of their own open theirs, with the secrets of their environment."""
    if job.rollout is None:
        return []
    from thinkbatch.tasks.tools import kept, secrets
    from thinkbatch.tasks.tools.tool import ToolboxError
    from thinkbatch.tasks.tools.toolbox import Toolbox

    errors = []
    if job.engine.kind != "vllm":
        errors.append("rollout: needs engine.kind vllm (a replay engine has one stored "
                      "completion per row, not a turn per conversation)")
    if not job.parsers.tool_call:
        errors.append("rollout: needs parsers.tool_call, the parser of the model's tool "
                      "calls (kimi_k2 for Kimi-K2)")
    here = job.scale.workers == 1
    if not here:
        errors += secrets.unsent(job)
    try:
        toolbox = (kept.keep if here else Toolbox.open)(job.rollout, Path.cwd())
    except ToolboxError as e:
        return errors + [str(e)]
    names = set(toolbox.names)
    if not here:
        toolbox.close()
    clash = sorted(names & {t["function"].get("name") for t in job.tools or ()
                            if isinstance(t, dict) and isinstance(t.get("function"), dict)})
    if clash:
        errors.append(f"tools: {', '.join(clash)} also served by rollout.tools; a tool name "
                      "must be one tool")
    return errors


def check_platform(job: JobSpec) -> list[str]:
    """What the installed vLLM build cannot run, said before the model loads: on the CPU
    build, decode context parallel fails at engine start (its MLA attention backend
    returns no softmax LSE, which DCP needs to merge partial attention), and seeded
    sampling with chunked prefill forced on kills the engine core (seeded_sampling_errors).
    It speaks for this machine only: check_job runs it where the engine loads in this
    process, and a scale-out worker runs it on its own node before its first claim
    (flows/worker.py), since a parent flow on a CPU node plans jobs for GPU workers."""
    errors = seeded_sampling_errors(job)
    if job.engine.kind != "vllm" or job.engine.decode_context_parallel_size == 1:
        return errors
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return errors
    return errors + [f"engine.decode_context_parallel_size: {job.engine.decode_context_parallel_size} "
            "needs a GPU build of vLLM; the CPU build's MLA attention backend returns no "
            "softmax LSE, which decode context parallel needs (use 1 on CPU)"]


def _shipped_tokenizer(folder: Path) -> str | None:
    """The tokenizer class a model folder ships as code (`auto_map` in its
    tokenizer_config.json, as Kimi-K2-Thinking's `tokenization_kimi.TikTokenTokenizer`)
    when no tokenizer.json stands beside it for transformers to load instead."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") if isinstance(config, dict) else None
    names = [a for a in (auto if isinstance(auto, list) else [auto]) if isinstance(a, str)]
    if not names or (folder / "tokenizer.json").exists():
        return None
    return names[0]


def check_tokenizer(job: JobSpec) -> list[str]:
    """The model's tokenizer, when it is a folder on this machine (a hub id's is checked as
    the engine loads, tasks/rows/parse.py): the class the model ships, and one that has every
    marker the chosen parsers look for as one token.

    Without trust_remote_code, transformers 5 does not refuse a tokenizer that `auto_map`
    names: it builds another class from the folder's files (from Kimi's `tiktoken.model`,
    a fast tokenizer with a split pattern of its own and other special tokens), so which
    tokenizer a job gets would hang on a flag."""
    source = job.engine.tokenizer or job.engine.model
    if not source or not Path(source).is_dir():
        return []
    if not job.engine.trust_remote_code and (shipped := _shipped_tokenizer(Path(source))):
        return [f"engine.trust_remote_code: {source} ships its own tokenizer ({shipped}, "
                "named by auto_map in tokenizer_config.json) and no tokenizer.json; without "
                "trust_remote_code transformers builds another tokenizer from its files, with "
                "its own special tokens and split pattern. Set engine.trust_remote_code: "
                "true, as the model's own deployment does (vllm serve --trust-remote-code)"]
    if not (job.parsers.reasoning or job.parsers.tool_call):
        return []
    from vllm.tokenizers import get_tokenizer

    from thinkbatch.tasks.rows.parse import MarkersMissing, OutputParser

    try:
        tokenizer = get_tokenizer(
            source, trust_remote_code=job.engine.trust_remote_code,
            tokenizer_mode=job.engine.vllm_args.get("tokenizer_mode", "auto"))
    except Exception as e:
        return [f"engine: the tokenizer of {source} does not load: {type(e).__name__}: {e}"]
    try:
        OutputParser(job.parsers, tokenizer, source)
    except MarkersMissing as e:
        return [f"parsers: {e}"]
    except TypeError:  # a parser name check_vllm refuses, or a parser vLLM refuses for
        return []      # this tokenizer: it says why as the engine loads
    return []


def check_job(job: JobSpec, failed: frozenset[str] = frozenset()) -> list[str]:
    """Every problem at once. `failed` names the sections that did not validate (their
    values are defaults, see JobFileError.partial): a check that needs one is skipped,
    so its pydantic errors come in the same round as every other check's."""
    def valid(*sections: str) -> bool:
        return not failed.intersection(sections)

    errors = []
    if valid("tools"):
        errors += check_tools(job)
    if valid("input"):
        errors += check_passthrough(job)
        errors += template_errors(job)
    if valid("output"):
        errors += check_compression(job)
    if valid("output", "scale"):
        errors += check_output_shared(job)
    if valid("storage"):
        try:
            store = Storage(job.storage)
            if valid("input"):
                errors += check_inputs(job, store)
            if valid("output"):
                errors += check_output(job, store)
            if valid("input", "output"):
                errors += check_output_outside_input(job, store)
        except StorageError as e:
            errors.append(f"storage: {e}")
    if not {"engine", "parsers", "sampling"} <= failed:
        errors += check_vllm(job)
    if valid("engine", "sampling", "input", "scale") and job.scale.workers == 1:
        errors += check_platform(job)
    if valid("engine", "parsers"):
        errors += check_tokenizer(job)
    if valid("rollout", "engine", "parsers", "tools"):
        errors += check_rollout(job)
    if not failed:
        errors += check_retry(job)
    return errors


def checked_job(load: Callable[[], JobSpec],
                more: Sequence[tuple[Callable[[JobSpec], list[str]], tuple[str, ...]]] = ()
                ) -> JobSpec:
    """The job `load` reads, or one JobFileError with every problem: pydantic's and those
    of every check whose sections validated. Callers run it before any flow starts, so a
    refusal is a message and exit 2, never a crashed flow. `more` are the caller's own
    checks, each with the sections it reads (flows/checks.py adds the Prefect server's):
    like the checks here, one is skipped when a section it reads failed."""
    failed: frozenset[str] = frozenset()
    errors: list[str] = []
    try:
        job = load()
    except JobFileError as e:
        if e.partial is None:
            raise
        job, failed, errors = e.partial, e.failed, list(e.errors)
    errors += check_job(job, failed)
    errors += [e for check, sections in more if failed.isdisjoint(sections)
               for e in check(job)]
    if errors:
        raise JobFileError(errors)
    return job
