"""A row becomes a chat request, or a row-level error that names why. Never dropped.

Per-row overrides (sampling, tools, chat template kwargs) are merged over the job's
defaults here, so an invalid override fails that row (`invalid_input`, the field named)
and never the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import pyarrow as pa
from pydantic import ValidationError

from thinkbatch.schemas.job import JobSpec, SamplingSpec
from thinkbatch.schemas.output import NO_COMPLETION, Status
from thinkbatch.schemas.record import RowRequest
from thinkbatch.schemas.tools import tool_errors
from thinkbatch.tasks.rows.read import ROW_ID, ROW_INDEX
from thinkbatch.tasks.tools.recorded import parse_recorded

ROLES = frozenset({"system", "user", "assistant", "tool"})
_NO_COMPLETION = frozenset(s.value for s in NO_COMPLETION)


class InvalidRow(ValueError):
    pass


def _environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


def _template(job: JobSpec) -> tuple[jinja2.Template | None, list[str]]:
    """Raises jinja2.TemplateError for a template that does not compile (template_errors
    says why, before any model loads)."""
    source = job.input.prompt_template
    if not source:
        return None, []
    env = _environment()
    return env.from_string(source), sorted(jinja2.meta.find_undeclared_variables(env.parse(source)))


def template_errors(job: JobSpec) -> list[str]:
    """The prompt template parsed and compiled as the renderer compiles it, and every filter
    and test it names looked up: Jinja defers an unknown one inside a block to render time,
    where it would fail every row that reaches it."""
    source = job.input.prompt_template
    if not source:
        return []
    env = _environment()
    try:
        tree = env.parse(source)
        unknown = [(f"no filter named {n.name!r}", n.lineno)
                   for n in tree.find_all(jinja2.nodes.Filter) if n.name not in env.filters]
        unknown += [(f"no test named {n.name!r}", n.lineno)
                    for n in tree.find_all(jinja2.nodes.Test) if n.name not in env.tests]
        if not unknown:
            env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        unknown = [(e.message or type(e).__name__, e.lineno)]
    return [f"input.prompt_template: {what} (line {line})"
            for what, line in dict.fromkeys(unknown)]


def needed_columns(job: JobSpec) -> list[str]:
    """Every input column the renderer reads: nothing else is ever loaded. A template that
    does not compile adds none (template_errors reports it)."""
    inp = job.input
    try:
        template_columns = _template(job)[1]
    except jinja2.TemplateError:
        template_columns = []
    cols = [inp.id_column, inp.messages_column, inp.prompt_column, *template_columns,
            inp.sampling_column, inp.tools_column, inp.chat_template_kwargs_column,
            inp.sample_index_column, inp.status_column, inp.error_column,
            *inp.passthrough_columns, job.rollout.recorded_column if job.rollout else None]
    if job.engine.kind == "replay":
        cols.append(job.engine.replay_column)
    return list(dict.fromkeys(c for c in cols if c))


def _text(value: Any, what: str) -> Any:
    """Bytes (a Parquet `binary` column where `string` was meant) read as UTF-8 text;
    any other value as it is."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRow(f"{what} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    return value


def _object(value: Any, what: str, kind: type) -> Any:
    """A struct/list value as is, or JSON text (str or UTF-8 bytes) decoded; None stays None."""
    value = _text(value, what)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRow(f"{what} is not valid JSON: {e.msg} at char {e.pos}") from None
    if value is not None and not isinstance(value, kind):
        raise InvalidRow(f"{what} must be a JSON {kind.__name__}")
    return value


def _present(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Struct columns give null for a field a row does not have: absent, as in JSON."""
    return {k: _text(v, f"{where}.{k}") for k, v in d.items() if v is not None}


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI's shape, `[{id, type: function, function: {name, arguments}}]` with the
    arguments as JSON text, kept as is: vLLM's chat path decodes them for the template.
    Arguments that are not a JSON object are refused here, where vLLM would render {}."""
    if not isinstance(calls, list):
        raise InvalidRow(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        call = _present(call, at) if isinstance(call, dict) else None
        fn = call.get("function") if call else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise InvalidRow(f"{at} must be {{type: function, function: {{name, arguments}}}}")
        fn = _present(fn, f"{at}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRow(f"{at}.function.name is missing")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(args, dict):
            raise InvalidRow(f"{at}.function.arguments must be a JSON object")
        out.append({**call, "function": fn})
    return out


def _message(m: Any, where: str) -> dict[str, Any]:
    """A user message needs text; an assistant message may have null content beside its
    tool calls; a tool message answers a call by its `tool_call_id` (as OpenAI requires,
    and Kimi's template prints it: without it the model cannot tell which call returned)."""
    if not isinstance(m, dict):
        raise InvalidRow(f"{where} is not an object")
    m = _present(m, where)
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise InvalidRow(f"{where}.role {role!r} is not one of {sorted(ROLES)}")
    if "tool_calls" in m:
        if role != "assistant":
            raise InvalidRow(f"{where}.tool_calls is only allowed in an assistant message")
        m["tool_calls"] = _tool_calls(m["tool_calls"], where)
    if role == "tool" and not (isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]):
        raise InvalidRow(f"{where}.tool_call_id is required in a tool message")
    if role == "user" and not (isinstance(content, str) and content.strip()):
        raise InvalidRow(f"{where}.content must be a non-empty string")
    if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
        raise InvalidRow(f"{where}.content must be a string (null only beside tool_calls)")
    return m


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRow("messages is null")
    value = _object(value, "messages", list)
    if not value:
        raise InvalidRow("messages must be a non-empty list of {role, content}")
    out = [_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    if not any(m["role"] == "user" for m in out):
        raise InvalidRow("messages has no user message")
    return out


class Renderer:
    """Compiles the job's template once and caches validated sampling overrides, since
    millions of rows usually share a handful of distinct overrides."""

    def __init__(self, job: JobSpec):
        self.job = job
        self.template, self.template_columns = _template(job)
        self._defaults = job.sampling.model_dump(by_alias=True)
        self._sampling: dict[str, SamplingSpec | str] = {}
        self._tool_errors: dict[str, str] = {}

    def _row_sampling(self, value: Any) -> SamplingSpec | None:
        if value is None:
            return None
        key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if key not in self._sampling:
            try:
                override = {k: v for k, v in _object(value, "sampling", dict).items()
                            if v is not None}  # struct columns give null for absent fields
                if "samples_per_prompt" in override:
                    override["n"] = override.pop("samples_per_prompt")
                spec = SamplingSpec.model_validate({**self._defaults, **override})
                if spec.n != self.job.sampling.n:  # the feeder makes the job's n samples
                    raise InvalidRow("sampling.n cannot differ per row; set sampling.n for "
                                     "the job")
                self._sampling[key] = spec
            except InvalidRow as e:
                self._sampling[key] = str(e)
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                self._sampling[key] = f"sampling.{where}: {err['msg']}"
        spec = self._sampling[key]
        if isinstance(spec, str):
            raise InvalidRow(spec)
        return spec

    def _row_tools(self, value: Any) -> list[dict[str, Any]] | None:
        """A row's tools, checked as the job's are (schemas/tools.py), once per distinct set."""
        tools = _object(value, "tools", list)
        if not tools:
            return None
        key = json.dumps(tools, sort_keys=True, default=str)
        if key not in self._tool_errors:
            self._tool_errors[key] = "; ".join(tool_errors(tools))
        if self._tool_errors[key]:
            raise InvalidRow(self._tool_errors[key])
        return tools

    def _prompt(self, cols: dict[str, list[Any]], i: int, row_id: str) -> str:
        if self.template is None:
            return _text(cols[self.job.input.prompt_column][i], "prompt")
        values = {c: cols[c][i] for c in self.template_columns}
        for c, v in values.items():
            if v is None:
                raise InvalidRow(f"prompt_template: column {c!r} is null in row {row_id!r}")
            values[c] = _text(v, f"prompt_template: column {c!r}")
        try:
            return self.template.render(**values)
        except Exception as e:
            raise InvalidRow(f"prompt_template failed on row {row_id!r}: "
                             f"{type(e).__name__}: {e}") from None

    def _fill(self, req: RowRequest, cols: dict[str, list[Any]], i: int) -> None:
        inp, job = self.job.input, self.job
        if inp.messages_column:
            req.messages = _messages(cols[inp.messages_column][i])
        elif inp.prompt_column or self.template is not None:
            prompt = self._prompt(cols, i, req.row_id)
            if not prompt:
                raise InvalidRow("prompt is null or empty")
            if not isinstance(prompt, str):
                raise InvalidRow("prompt is not a string")
            if not prompt.strip():
                raise InvalidRow("prompt is blank: only whitespace")
            system = [{"role": "system", "content": inp.system_prompt}] if inp.system_prompt else []
            req.messages = [*system, {"role": "user", "content": prompt}]
        if inp.sampling_column:
            req.sampling = self._row_sampling(cols[inp.sampling_column][i])
        req.tools = (self._row_tools(cols[inp.tools_column][i]) if inp.tools_column
                     else None) or job.tools
        req.chat_template_kwargs = dict(job.chat_template_kwargs)
        if inp.chat_template_kwargs_column:
            row = _object(cols[inp.chat_template_kwargs_column][i], "chat_template_kwargs", dict)
            req.chat_template_kwargs.update(row or {})
        if inp.sample_index_column:
            req.sample_index = cols[inp.sample_index_column][i]
        if job.rollout and (column := job.rollout.recorded_column):
            try:
                req.recorded = parse_recorded(_text(cols[column][i], column))
            except ValueError as e:
                raise InvalidRow(f"rollout recorded column {column!r}: {e}") from None
        if job.engine.kind == "replay":
            self._keep_stored(req, cols, i)
            text = cols[job.engine.replay_column][i]
            if text is None:
                raise InvalidRow(f"replay column {job.engine.replay_column!r} is null")
            req.replay_text = text

    def _keep_stored(self, req: RowRequest, cols: dict[str, list[Any]], i: int) -> None:
        """A stored row that never had a completion has nothing to replay: it keeps its
        status and error (re-parsing an output must not turn them into new errors); a
        truncated one replays as cut off by max_tokens."""
        inp = self.job.input
        stored = cols[inp.status_column][i] if inp.status_column else None
        if stored == Status.TRUNCATED.value:  # stays truncated, whatever the parsers say
            req.replay_finish_reason = "length"
        if stored in _NO_COMPLETION:
            req.status = Status(stored)
            raise InvalidRow((cols[inp.error_column][i] if inp.error_column else None)
                             or f"stored as {stored}")

    def render_batch(self, batch: pa.RecordBatch) -> Iterator[RowRequest]:
        """Column-wise conversion once per batch, then one small object per row."""
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        passthrough = [cols[c] for c in self.job.input.passthrough_columns]
        for i, (row_index, row_id) in enumerate(zip(cols[ROW_INDEX], cols[ROW_ID])):
            req = RowRequest(row_index=row_index, row_id=row_id,
                             passthrough=tuple(c[i] for c in passthrough),
                             allow_special_tokens=self.job.input.allow_special_tokens,
                             min_room_tokens=self.job.sampling.min_room_tokens)
            try:
                if row_id is None:
                    req.row_id = f"row:{row_index}"
                    raise InvalidRow(f"id column {self.job.input.id_column!r} is null")
                self._fill(req, cols, i)
            except InvalidRow as e:
                req.error = str(e)
            yield req
