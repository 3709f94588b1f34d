"""The job's `rollout` section: run the model's tool calls and continue each conversation
until it answers. Where the tools come from is a list of sources, each exactly one of a
Python module, an MCP server, or results recorded in an input column; tasks/tools/
opens them (and checks that tool names are unique across sources) before the model loads.

An MCP server's `env` values, its `headers` values and its URL's credentials (user info,
query values, fragment) are secrets: a JSON dump of the job (the manifest's config, the resume fingerprint,
Prefect's parameters) shows them as `MASK`, so none is written and a rotated key changes
no fingerprint. A value may instead name variables of the environment (`${API_KEY}`),
read where the server starts: such a value is written as it is, and survives a retry or
the trip to another worker. What is done with the values (resolved where a server
starts, scrubbed from error texts) is tasks/tools/secrets.py's.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler,
                      field_serializer, model_serializer, model_validator)

MAX_RESTARTS = 3
MASK = "**********"  # a secret's place in anything written (pydantic's SecretStr mask)
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def masked(value: str) -> str:
    """A value that names the environment's variables is no secret; any other is."""
    return value if not value or REFERENCE.search(value) else MASK


def masked_url(url: str) -> str:
    """The URL with its user info, query values and fragment masked (unless references)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    query = "&".join(f"{k}{eq}{masked(v)}" for k, eq, v in
                     (p.partition("=") for p in parts.query.split("&") if p))
    return urlunsplit((parts.scheme, f"{masked(userinfo)}{at}{host}", parts.path, query,
                       masked(parts.fragment)))


class _Strict(BaseModel):
    """Unknown keys are errors, as in schemas/job.py (which imports this module, so the
    base is not shared)."""

    model_config = ConfigDict(extra="forbid")


class McpServerSpec(_Strict):
    """An MCP server: a stdio command that thinkbatch starts (and stops) itself, or the
    URL of a running streamable-HTTP server."""

    command: list[str] | None = Field(
        default=None, min_length=1,
        description="argv of a stdio server, run in the working directory (like input.path); `python` is the "
                    "interpreter running thinkbatch.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of the stdio server (it inherits only HOME, PATH, "
                    "SHELL, TERM, USER, LOGNAME, as the mcp package does). Values are "
                    "secrets, never written; `${VAR}` takes one from thinkbatch's environment.")
    url: str | None = Field(
        default=None, pattern=r"^https?://",
        description="A streamable-HTTP endpoint, e.g. http://host:8000/mcp; its user info, "
                    "query values and fragment are secrets, never written; `${VAR}` takes "
                    "one from thinkbatch's environment.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="HTTP headers sent to a url server, e.g. `Authorization: Bearer "
                    "${MCP_TOKEN}`. Values are secrets, never written; `${VAR}` takes one "
                    "from thinkbatch's environment.")
    max_restarts: int = Field(
        default=MAX_RESTARTS, ge=0,
        description="A server that stops (a stdio command that exits, an HTTP session "
                    "lost) is started again, with backoff, at most this many times without "
                    "serving a call in between; then its tools fail and conversations that "
                    "call them end `tool_error`.")

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("set one of command (a stdio server) or url (streamable HTTP)")
        if self.url is not None and self.env:
            raise ValueError("env applies to a stdio command only, not to a url")
        if self.command is not None and self.headers:
            raise ValueError("headers apply to a url only, not to a stdio command")
        return self

    @field_serializer("env", "headers", when_used="json")
    def _masked_values(self, values: dict[str, str]) -> dict[str, str]:
        return {k: masked(v) for k, v in values.items()}

    @model_serializer(mode="wrap")
    def _later_fields_when_set(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Fields added later are dumped only when set: a job written before them keeps
        its resume fingerprint (tasks/store/fingerprint.py counts the dump)."""
        data = handler(self)
        if not self.headers:
            data.pop("headers", None)
        if self.max_restarts == MAX_RESTARTS:
            data.pop("max_restarts", None)
        return data

    @field_serializer("url", when_used="json")
    def _masked_url(self, url: str | None) -> str | None:
        return None if url is None else masked_url(url)


class RecordedSpec(_Strict):
    """Tool results read from an input column instead of running tools: deterministic
    re-runs and tests. The column holds, per row, a JSON object (text), a struct or a map
    from a call id (e.g. `functions.get_weather:0`), or else a tool name, to the result
    text; a call with no result there is a tool error the model sees."""

    column: str


class ToolSource(_Strict):
    """Exactly one of `python`, `mcp`, `recorded`."""

    python: str | None = Field(
        default=None, min_length=1,
        description="A file (`tools.py`, relative to the working directory, like input.path) or a module "
                    "(`package.tools`): each public function defined there is a tool.")
    mcp: McpServerSpec | None = None
    recorded: RecordedSpec | None = None
    functions: list[str] | None = Field(
        default=None, min_length=1,
        description="python or mcp: only these tools of the source (default: all).")
    isolated: bool = Field(
        default=False,
        description="python only: run each call in a worker process, killed at its timeout "
                    "(default: a thread, which Python cannot stop).")

    @model_validator(mode="after")
    def _one_kind(self) -> ToolSource:
        kinds = [k for k in ("python", "mcp", "recorded") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a tool source is exactly one of python, mcp, recorded; got "
                             f"{kinds or 'none'}")
        if self.recorded is not None and self.functions is not None:
            raise ValueError("functions picks tools of a python or mcp source, not recorded")
        if self.isolated and self.python is None:
            raise ValueError("isolated applies to a python source only")
        return self

    @model_serializer(mode="wrap")
    def _later_fields_when_set(self, handler: SerializerFunctionWrapHandler) -> Any:
        """`isolated` came later: dumped only when set (see McpServerSpec's)."""
        data = handler(self)
        if not self.isolated:
            data.pop("isolated", None)
        return data

    @property
    def label(self) -> str:
        """The source as a user wrote it, for error messages."""
        if self.python is not None:
            return f"python {self.python}"
        if self.mcp is not None:
            return f"mcp {masked_url(self.mcp.url) if self.mcp.url else self.mcp.command}"
        assert self.recorded is not None
        return f"recorded column {self.recorded.column}"


HIDDEN = "[tool result hidden to save context]"  # a hidden tool message's content
BUDGET_SHARE = 0.8  # the default budget: this share of max_model_len


class ContextSpec(_Strict):
    """What a conversation whose history outgrows the window does (tasks/rows/context.py).
    `stop`: it ends `prompt_too_long`, the turn named, once its prompt leaves less than
    `sampling.min_room_tokens` of `max_model_len`. `hide_tool_results`: once the prompt
    passes the budget, earlier tool messages' contents become a placeholder, oldest
    first, until it fits (the strategy Moonshot describes for Kimi-K2-Thinking's long
    agentic evaluations); the messages, tool call ids included, are still rendered by
    the model's own template."""

    policy: Literal["stop", "hide_tool_results"] = "stop"
    budget_tokens: int | None = Field(
        default=None, ge=1,
        description="hide_tool_results: the prompt size past which results are hidden "
                    f"(default: {BUDGET_SHARE:.0%} of max_model_len, a fifth of the window "
                    "left for each turn: 52k tokens at 256k). Never more than the window "
                    "less sampling.min_room_tokens.")
    keep_last: int = Field(
        default=1, ge=0,
        description="hide_tool_results: the last this many tool messages are never hidden.")

    @model_validator(mode="after")
    def _hiding_fields(self) -> ContextSpec:
        if self.policy == "stop" and (self.budget_tokens is not None or self.keep_last != 1):
            raise ValueError("budget_tokens and keep_last apply to policy hide_tool_results")
        return self


class RolloutSpec(_Strict):
    max_turns: int = Field(default=8, ge=1, description="Assistant turns per conversation.")
    tools: list[ToolSource] = Field(
        min_length=1,
        description="Where tool calls run; live tools first, then recorded results.")
    tool_timeout_s: float = Field(
        default=30, gt=0,
        description="A call running longer is abandoned; the model sees a timeout error.")
    max_malformed_turns: int = Field(
        default=3, ge=0,
        description="Consecutive turns with malformed tool calls (arguments that are not a "
                    "JSON object) answered with the error as the tool message; the next one "
                    "ends the conversation parse_error. 0: the first one does.")
    max_tool_error_rate: float | None = Field(
        default=None, gt=0, le=1,
        description="Stop the job once more than this share of its tool calls failed (judged "
                    "from 20 calls on): tools that are down should not turn into thousands "
                    "of conversations about error messages. Default: never stop.")
    max_concurrent_tools: int = Field(default=16, ge=1,
                                      description="Tool calls running at once, all rows.")
    context: ContextSpec = Field(
        default_factory=ContextSpec,
        description="A history that outgrows max_model_len: stop (default) or hide earlier "
                    "tool results.")
    checkpoint_seconds: float | None = Field(
        default=10, ge=0,
        description="Open conversations are saved at turn boundaries (their tools returned) "
                    "into the output's `_open/` folder, at most this many seconds apart, so "
                    "a kill resumes each at its last saved tool call instead of turn 1 "
                    "(its tools not run again). 0: at every turn boundary, each next turn "
                    "waiting until its save is written (a kill then regenerates at most one "
                    "turn per conversation); null: never (a kill redoes open conversations "
                    "from their first turn).")

    @model_validator(mode="after")
    def _one_recorded(self) -> RolloutSpec:
        if sum(s.recorded is not None for s in self.tools) > 1:
            raise ValueError("at most one recorded source (one column of results)")
        return self

    @property
    def recorded_column(self) -> str | None:
        """The input column of recorded results, if a source reads one."""
        return next((s.recorded.column for s in self.tools if s.recorded is not None), None)
