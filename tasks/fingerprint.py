"""A fingerprint of everything that changes a job's outputs, kept part by part so a
refused resume can name exactly what changed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.tasks.storage import FileStat


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = _canon(value)


def fingerprint_parts(job: JobSpec, files: list[FileStat]) -> dict[str, str]:
    """Flat `section.field -> canonical JSON value`; input files hashed into one part."""
    listing = _canon([(f.path, f.size, f.version) for f in files])
    parts = {"input.files": hashlib.sha256(listing.encode()).hexdigest()[:16]}
    inp = job.input.model_dump(include={"id_column", "messages_column", "prompt_column",
                                        "system_prompt", "passthrough_columns"})
    _flatten("input", inp, parts)
    _flatten("shards", job.shards.model_dump(), parts)
    _flatten("engine", job.engine.output_affecting(), parts)
    _flatten("sampling", job.sampling.model_dump(mode="json", by_alias=True), parts)
    _flatten("chat_template_kwargs", job.chat_template_kwargs, parts)
    _flatten("parsers", job.parsers.model_dump(), parts)
    parts["output.keep_raw_text"] = _canon(job.output.keep_raw_text)
    return parts


def digest(parts: dict[str, str]) -> str:
    return hashlib.sha256(_canon(parts).encode()).hexdigest()


def describe_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human lines naming each changed field, e.g. `sampling.temperature: 0.6 -> 1.0`."""
    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "(unset)"), new.get(key, "(unset)")
        if before == after:
            continue
        if key == "input.files":
            lines.append("input files changed (size, mtime or ETag)")
        else:
            lines.append(f"{key}: {before} -> {after}")
    return lines
