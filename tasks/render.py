"""A row becomes a chat request, or a row-level error that names why. Never dropped.

Per-row overrides (sampling, tools, chat template kwargs) are merged over the job's
defaults here, so an invalid override fails that row (`invalid_input`, the field named)
and never the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import pyarrow as pa
from pydantic import ValidationError

from thinkbatch.schemas.job import JobSpec, SamplingSpec
from thinkbatch.tasks.read import ROW_ID, ROW_INDEX

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(slots=True)
class RowRequest:
    row_index: int
    row_id: str
    passthrough: tuple[Any, ...]
    messages: list[dict[str, Any]] | None = None
    replay_text: str | None = None
    sampling: SamplingSpec | None = None  # the row's own, when it overrides the job's
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_index: int | None = None  # replay of stored outputs: the stored sample index
    error: str | None = None  # set: the row is invalid_input, with this reason


class InvalidRow(ValueError):
    pass


def _template(job: JobSpec) -> tuple[jinja2.Template | None, list[str]]:
    source = job.input.prompt_template
    if not source:
        return None, []
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(source), sorted(jinja2.meta.find_undeclared_variables(env.parse(source)))


def needed_columns(job: JobSpec) -> list[str]:
    """Every input column the renderer reads: nothing else is ever loaded."""
    inp = job.input
    cols = [inp.id_column, inp.messages_column, inp.prompt_column, *_template(job)[1],
            inp.sampling_column, inp.tools_column, inp.chat_template_kwargs_column,
            inp.sample_index_column, *inp.passthrough_columns]
    if job.engine.kind == "replay":
        cols.append(job.engine.replay_column)
    return list(dict.fromkeys(c for c in cols if c))


def _object(value: Any, what: str, kind: type) -> Any:
    """A struct/list value as is, or JSON text decoded; None stays None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRow(f"{what} is not valid JSON: {e.msg} at char {e.pos}") from None
    if value is not None and not isinstance(value, kind):
        raise InvalidRow(f"{what} must be a JSON {kind.__name__}")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise InvalidRow("messages is null")
    value = _object(value, "messages", list)
    if not value:
        raise InvalidRow("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRow(f"messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRow(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
        if not isinstance(content, str) or (role == "user" and not content.strip()):
            raise InvalidRow(f"messages[{i}].content must be a non-empty string")
        out.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRow("messages has no user message")
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    tools = _object(value, "tools", list)
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRow(f"tools[{i}] must be {{type: function, function: {{name, ...}}}}")
    return tools or None


class Renderer:
    """Compiles the job's template once and caches validated sampling overrides, since
    millions of rows usually share a handful of distinct overrides."""

    def __init__(self, job: JobSpec):
        self.job = job
        self.template, self.template_columns = _template(job)
        self._defaults = job.sampling.model_dump(by_alias=True)
        self._sampling: dict[str, SamplingSpec | str] = {}

    def _row_sampling(self, value: Any) -> SamplingSpec | None:
        if value is None:
            return None
        key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if key not in self._sampling:
            try:
                override = {k: v for k, v in _object(value, "sampling", dict).items()
                            if v is not None}  # struct columns give null for absent fields
                self._sampling[key] = SamplingSpec.model_validate({**self._defaults, **override})
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

    def _prompt(self, cols: dict[str, list[Any]], i: int, row_id: str) -> str:
        if self.template is None:
            return cols[self.job.input.prompt_column][i]
        values = {c: cols[c][i] for c in self.template_columns}
        for c, v in values.items():
            if v is None:
                raise InvalidRow(f"prompt_template: column {c!r} is null in row {row_id!r}")
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
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidRow("prompt is null or empty" if not prompt else "prompt is not a string")
            system = [{"role": "system", "content": inp.system_prompt}] if inp.system_prompt else []
            req.messages = [*system, {"role": "user", "content": prompt}]
        if inp.sampling_column:
            req.sampling = self._row_sampling(cols[inp.sampling_column][i])
        req.tools = (_tools(cols[inp.tools_column][i]) if inp.tools_column else None) or job.tools
        req.chat_template_kwargs = dict(job.chat_template_kwargs)
        if inp.chat_template_kwargs_column:
            row = _object(cols[inp.chat_template_kwargs_column][i], "chat_template_kwargs", dict)
            req.chat_template_kwargs.update(row or {})
        if inp.sample_index_column:
            req.sample_index = cols[inp.sample_index_column][i]
        if job.engine.kind == "replay":
            text = cols[job.engine.replay_column][i]
            if text is None:
                raise InvalidRow(f"replay column {job.engine.replay_column!r} is null")
            req.replay_text = text

    def render_batch(self, batch: pa.RecordBatch) -> Iterator[RowRequest]:
        """Column-wise conversion once per batch, then one small object per row."""
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        passthrough = [cols[c] for c in self.job.input.passthrough_columns]
        for i, (row_index, row_id) in enumerate(zip(cols[ROW_INDEX], cols[ROW_ID])):
            req = RowRequest(row_index=row_index, row_id=row_id,
                             passthrough=tuple(c[i] for c in passthrough))
            try:
                if row_id is None:
                    req.row_id = f"row:{row_index}"
                    raise InvalidRow(f"id column {self.job.input.id_column!r} is null")
                self._fill(req, cols, i)
            except InvalidRow as e:
                req.error = str(e)
            yield req
