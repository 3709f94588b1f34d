"""A fingerprint of everything that changes a job's outputs, kept part by part so a
refused resume can name exactly what changed.

It is derived from the job schema: every field and every vLLM engine argument counts
unless schemas/job.py lists it in SPEED_ONLY, so one added later counts without anyone
remembering to list it here. What came to count later (an optional section, `rollout`; a
field once speed-only, `engine.decode_context_parallel_size`) is listed in
COUNTS_WHEN_SET: at its default it adds no part, so outputs written before it counted
still resume. Values are taken from the job's JSON dump, where the schema masks secrets
(an MCP server's env values and URL credentials, see schemas/rollout.py): they count for
nothing and are never written into `_plan.json`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from thinkbatch.schemas.job import COUNTS_WHEN_SET, SPEED_ONLY, EngineSpec, JobSpec
from thinkbatch.tasks.store.storage import FileStat

# vLLM's engine arguments keep the part names they had when `dtype`, `quantization` and
# `load_format` were fields of EngineSpec (a part each, at their defaults too) and every
# other argument went under `engine.extra_args`: the parts of an output written then are
# the parts of the same job now, however it spells its arguments, so that output resumes.
FORMER_FIELDS = {"dtype": "auto", "quantization": None, "load_format": "auto"}
ARGS = "engine.extra_args"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    """A mapping becomes one part per leaf, so a change names its key; an empty one adds
    none (`{}` and unset mean the same to vLLM and to the chat template)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = _canon(value)


def _walk(prefix: str, model: BaseModel, out: dict[str, str]) -> None:
    """Each field under the name a job file uses (its alias, e.g. `structured_outputs.json`)."""
    for name, info in type(model).model_fields.items():
        [(key, value)] = model.model_dump(mode="json", by_alias=True, include={name}).items()
        path = f"{prefix}{key}"
        if path in SPEED_ONLY:
            continue
        if path in COUNTS_WHEN_SET and getattr(model, name) == info.get_default(
                call_default_factory=True):
            continue  # came to count later: at its default, older outputs still resume
        if isinstance(getattr(model, name), BaseModel):
            _walk(f"{path}.", getattr(model, name), out)
        else:
            _flatten(path, value, out)


def _engine_args(engine: EngineSpec, out: dict[str, str]) -> None:
    """The vLLM engine arguments not listed speed-only, under their former part names."""
    args = engine.model_dump(mode="json", include=set(engine.vllm_args))
    counted = {k: v for k, v in args.items() if f"engine.{k}" not in SPEED_ONLY}
    for key, default in FORMER_FIELDS.items():
        out[f"engine.{key}"] = _canon(counted.pop(key, default))
    _flatten(ARGS, counted, out)


def fingerprint_parts(job: JobSpec, files: list[FileStat]) -> dict[str, str]:
    """Flat `section.field -> canonical JSON value` of every field and engine argument not
    listed speed-only; the input files (path, size, mtime or ETag) hashed into one part."""
    listing = _canon([(f.path, f.size, f.version) for f in files])
    parts = {"input.files": hashlib.sha256(listing.encode()).hexdigest()[:16]}
    _walk("", job, parts)
    _engine_args(job.engine, parts)
    return parts


def digest(parts: dict[str, str]) -> str:
    return hashlib.sha256(_canon(parts).encode()).hexdigest()


def _defaults(prefix: str, kind: type[BaseModel], out: dict[str, str]) -> dict[str, str]:
    """The value a COUNTS_WHEN_SET field has where it adds no part (a section's None
    reads as unset), so a change to its default reads `8 -> 1`."""
    for name, info in kind.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        if key in COUNTS_WHEN_SET:
            default = info.get_default(call_default_factory=True)
            if default is not None:
                out[key] = _canon(default)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            _defaults(f"{key}.", info.annotation, out)
    return out


_AT_DEFAULT = _defaults("", JobSpec, {})


def describe_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human lines naming each changed field as a job file spells it now, e.g.
    `sampling.temperature: 0.6 -> 1.0`, `engine.block_size: 16 -> 32`."""
    lines = []
    for key in sorted(old.keys() | new.keys()):
        unset = _AT_DEFAULT.get(key, "(unset)")
        before, after = old.get(key, unset), new.get(key, unset)
        if before == after:
            continue
        if key == "input.files":
            lines.append("input files changed (size, mtime or ETag)")
        else:
            shown = key.replace(f"{ARGS}.", "engine.", 1)
            lines.append(f"{shown}: {_short(before)} -> {_short(after)}")
    return lines


def _short(value: str, keep: int = 60) -> str:
    """A long template or tool list is shown by its ends, enough to tell the two apart."""
    return value if len(value) <= 2 * keep + 5 else f"{value[:keep]} ... {value[-keep:]}"
