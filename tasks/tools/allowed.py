"""The tool sources a machine allows: a job file's `python` source imports and runs any
module, and its `mcp` command runs any program, as the user running thinkbatch. A work
pool that runs other people's job files (a deployment's parameters carry a job) sets
THINKBATCH_ALLOWED_TOOL_SOURCES in its workers' environment, and a job with any other
source is refused before anything of it is imported or started (Toolbox.open checks
first; the job's checks report it before the model loads).

The value is a list of patterns separated by `;` or new lines, each `KIND:PATTERN` in
fnmatch's syntax (`*` matches anything, `/` and spaces too, so an exact entry is the
safest):
- `python:NAME` a module by name (`python:mytools.*`), `python:/ABS/PATH` a tools file,
  matched against its resolved absolute path (a relative `../` cannot slip out);
- `mcp:COMMAND` a stdio command, its argv joined by spaces as written in the job
  (`mcp:python /srv/mcp/search.py`);
- `url:URL` an HTTP server, matched without its user info, query and fragment
  (`url:https://search.internal:8000/*`).
Recorded sources run nothing and are always allowed. Unset, every source is allowed.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from thinkbatch.schemas.rollout import RolloutSpec, ToolSource

ENV = "THINKBATCH_ALLOWED_TOOL_SOURCES"
KINDS = ("python", "mcp", "url")


def patterns() -> list[tuple[str, str]] | None:
    """(kind, pattern) of the environment's allow-list; None when it is not set."""
    value = os.environ.get(ENV)
    if value is None:
        return None
    found = []
    for entry in (e.strip() for e in re.split(r"[;\n]", value)):
        kind, _, pattern = entry.partition(":")
        if entry and (kind not in KINDS or not pattern):
            raise ValueError(f"{ENV}: {entry!r} is not KIND:PATTERN with KIND one of "
                             f"{', '.join(KINDS)}")
        if entry:
            found.append((kind, pattern))
    return found


def refused(spec: RolloutSpec, base_dir: Path) -> list[str]:
    """The job's tool sources the allow-list does not name, each as an error."""
    try:
        allowed = patterns()
    except ValueError as e:
        return [str(e)]
    if allowed is None:
        return []
    errors = []
    for i, source in enumerate(spec.tools):
        what = _as_listed(source, base_dir)
        if what is None:
            continue
        kind, name = what
        if not any(k == kind and fnmatch.fnmatchcase(name, p) for k, p in allowed):
            errors.append(f"rollout.tools[{i}] ({source.label}): {kind}:{name} is not "
                          f"allowed here ({ENV} names the tool sources this machine runs)")
    return errors


def _as_listed(source: ToolSource, base_dir: Path) -> tuple[str, str] | None:
    """The source as an allow-list names it; None for one that runs nothing."""
    if source.python is not None:
        ref = source.python
        if ref.endswith(".py") or "/" in ref:
            return "python", str((base_dir / ref).resolve())
        return "python", ref
    if source.mcp is not None and source.mcp.command is not None:
        return "mcp", " ".join(source.mcp.command)
    if source.mcp is not None and source.mcp.url is not None:
        parts = urlsplit(source.mcp.url)
        return "url", urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                  "", ""))
    return None
