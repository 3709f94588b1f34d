"""The secrets of MCP servers, in one place: resolved where a server starts, scrubbed from
every error text the toolbox logs or writes, and refused where they could not arrive.

An MCP server's `env` and `headers` values and its URL's user info, query values and
fragment are secrets. How they are written (masked in every JSON dump of the job) is the schema's
concern (schemas/rollout.py, which may import nothing of tasks/); everything done with
their values is here: `${VAR}` references expanded from this process's environment, the
resolved values kept for scrubbing, and the check that a scale-out job's secrets can
reach its workers at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.rollout import MASK, REFERENCE, McpServerSpec
from thinkbatch.tasks.tools.tool import ToolboxError

SECRET_MIN_CHARS = 8  # shorter env values (DEBUG=1) are no keys: scrubbing them garbles text


def expand(value: str, where: str) -> str:
    """`${VAR}` replaced from this process's environment; a masked value (a job read back
    from a manifest or from Prefect's parameters) has lost its secret."""
    if MASK in value:
        raise ValueError(f"{where}: the value was not stored (thinkbatch writes no secret); "
                         "write it as ${VAR} and set VAR in the environment")

    def lookup(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            raise ValueError(f"{where}: {m.group(0)} is not set in the environment")
        return os.environ[m.group(1)]

    return REFERENCE.sub(lookup, value)


def resolved_env(server: McpServerSpec) -> dict[str, str]:
    """The server's environment as given to it; ValueError names a value it lacks."""
    return {k: expand(v, f"env.{k}") for k, v in server.env.items()}


def resolved_headers(server: McpServerSpec) -> dict[str, str]:
    """The HTTP headers as sent to a url server; ValueError names a value it lacks."""
    return {k: expand(v, f"headers.{k}") for k, v in server.headers.items()}


def resolved_url(server: McpServerSpec) -> str | None:
    return None if server.url is None else expand(server.url, "url")


def _url_credentials(url: str) -> list[str]:
    """The parts of a URL that may hold a secret: user info (and its user, password),
    query values, fragment."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return [userinfo, *userinfo.split(":"),
            *(p.partition("=")[2] for p in parts.query.split("&")), parts.fragment]


class Secrets:
    """The resolved secrets of a toolbox's MCP servers, longest first."""

    def __init__(self, values: Iterable[str] = ()):
        self._values = sorted(set(values), key=len, reverse=True)

    @classmethod
    def of(cls, servers: Iterable[tuple[str, McpServerSpec]]) -> Secrets:
        """The secrets of (where, server) as the servers get them (ToolboxError for a
        `${VAR}` not set, or a value that was masked when the job was written)."""
        found: list[str] = []
        for at, server in servers:
            try:
                url = resolved_url(server)
                headers = resolved_headers(server).values()
                found += [*resolved_env(server).values(), *headers,
                          *(h.split()[-1] for h in headers if h.split()),  # a bearer's token
                          *(_url_credentials(url) if url else ())]
            except ValueError as e:
                raise ToolboxError(f"{at}: {e}") from None
        return cls(s for s in found if len(s) >= SECRET_MIN_CHARS)

    def scrub(self, text: str) -> str:
        """An error's text without the secrets: it is logged or written as a tool result,
        and may quote them (an HTTP error names its URL, a server its key)."""
        for secret in self._values:
            text = text.replace(secret, MASK)
        return text


def unsent(job: JobSpec) -> list[str]:
    """K workers get the job as Prefect parameters, which hold no secret (a JSON dump
    masks them): a secret must come from each worker's environment, as `${VAR}`."""
    assert job.rollout is not None
    errors = []
    for i, source in enumerate(job.rollout.tools):
        if source.mcp is None:
            continue
        written, given = source.mcp.model_dump(mode="json"), source.mcp.model_dump()
        errors += [f"rollout.tools[{i}].mcp.{field}.{k}: with scale.workers > 1 a secret "
                   "reaches the workers only from their environment: write it as ${VAR}"
                   for field in ("env", "headers")
                   for k in given.get(field, {})
                   if written[field][k] != given[field][k]]
        if written["url"] != given["url"]:
            errors.append(f"rollout.tools[{i}].mcp.url: with scale.workers > 1 its "
                          "credentials reach the workers only from their environment: "
                          "write them as ${VAR}")
    return errors
