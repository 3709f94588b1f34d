"""Re-parsing a stored output with other parsers: a replay job over its raw text.

A rollout output is refused: each turn's parse chose the tools that ran and so the next
turn's prompt, and the raw text kept is the last turn's only. Re-parsing that turn alone
would give a row whose columns disagree with the trajectory that produced them (an answer
that now parses as tool calls nobody ran), and re-parsing earlier turns cannot change what
their tools returned. Other parsers for a rollout mean running it again."""

from __future__ import annotations

from typing import Any

from thinkbatch.schemas.job import JobSpec
from thinkbatch.schemas.job_file import JobFileError
from thinkbatch.tasks.store.checkpoint import read_manifest
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


def reparse_job(source: str, target: str, reasoning: str | None,
                tool_call: str | None) -> JobSpec:
    """The same ids, samples and passthrough columns; the completion text from `raw_text`;
    the tokenizer, template kwargs (the job's, and a row's own from its
    `chat_template_kwargs` column) and JSON schema of the original job; rows that never
    had a completion keep their status and error; checkpointed like any run."""
    layout = OutputLayout(source, Storage())
    try:
        original = read_manifest(layout).config
    except FileNotFoundError:
        raise JobFileError([f"{source} has no _manifest.json: only a finished output can "
                            "be re-parsed"]) from None
    if original.get("rollout") is not None:
        raise JobFileError([f"{source} is a rollout output: each turn's parse chose the "
                            "tools that ran and the next turn's prompt, so a turn cannot be "
                            "re-parsed without generating again what followed it; run the "
                            "job again with the other parsers (parsers.reasoning, "
                            "parsers.tool_call) and a new output.path"])
    if not original["output"]["keep_raw_text"]:
        raise JobFileError([f"{source} was written without raw text; re-parsing needs a "
                            "job run with output.keep_raw_text: true"])
    engine = original["engine"]
    job: dict[str, Any] = {
        "name": f"reparse of {original['name']}",
        "input": {"path": layout.data, "id_column": "id", "prompt_column": None,
                  "sample_index_column": "sample_index",
                  "chat_template_kwargs_column": "chat_template_kwargs",
                  "status_column": "status", "error_column": "error",
                  "passthrough_columns": original["input"]["passthrough_columns"]},
        "engine": {"kind": "replay", "tokenizer": engine["tokenizer"] or engine["model"],
                   "trust_remote_code": engine["trust_remote_code"],
                   "revision": engine["revision"], "replay_column": "raw_text"},
        "chat_template_kwargs": original["chat_template_kwargs"],
        "sampling": {"structured_outputs": original["sampling"]["structured_outputs"]},
        "tools": original["tools"],
        "parsers": {"reasoning": reasoning, "tool_call": tool_call},
        "output": {**original["output"], "path": target},
        "storage": original["storage"],
    }
    return JobSpec.model_validate(job)
