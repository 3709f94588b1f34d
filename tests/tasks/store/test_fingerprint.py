from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas import job as job_schema
from thinkbatch.schemas.job import EngineSpec, JobSpec
from thinkbatch.schemas.job_file import deep_merge, load_job
from thinkbatch.schemas.manifest import RunFigures
from thinkbatch.tasks.report.manifest import build_manifest
from thinkbatch.tasks.store import checkpoint
from thinkbatch.tasks.store.checkpoint import ResumeRefused
from thinkbatch.tasks.store.fingerprint import describe_changes, digest, fingerprint_parts
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import FileStat, Storage

FILES = [FileStat("a.parquet", 10, "1")]
BASE: dict[str, Any] = {"input": {"path": "a"}, "engine": {"model": "m"}, "output": {"path": "o"}}
TEMPLATE = {"input": {"prompt_template": "Q: {{ prompt }}"}}


def _parts(change: dict[str, Any] | None = None, base: dict[str, Any] | None = None):
    job = load_job(inline=deep_merge(deep_merge(BASE, base or {}), change or {}))
    return fingerprint_parts(job, FILES)


def _parts_sampling(**sampling):
    return _parts({"sampling": sampling})


def test_changes_name_the_field_and_values() -> None:
    lines = describe_changes(_parts_sampling(temperature=0.6), _parts_sampling(temperature=1.0))
    assert lines == ["sampling.temperature: 0.6 -> 1.0"]


def test_input_file_change_is_named() -> None:
    old = _parts()
    new = fingerprint_parts(load_job(inline=BASE), [FileStat("a.parquet", 11, "2")])
    assert describe_changes(old, new) == ["input files changed (size, mtime or ETag)"]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
COUNTED = [
    ("input.prompt_template", TEMPLATE, {"input": {"prompt_template": "Question: {{ prompt }}"}}),
    ("tools", {}, {"tools": [TOOL]}),
    ("input.sampling_column", {}, {"input": {"sampling_column": "params"}}),
    ("input.tools_column", {}, {"input": {"tools_column": "tools"}}),
    ("input.chat_template_kwargs_column", {}, {"input": {"chat_template_kwargs_column": "k"}}),
    ("input.sample_index_column", {"engine": {"kind": "replay"}},
     {"input": {"sample_index_column": "sample_index"}}),
    ("engine.compilation_config", {},
     {"engine": {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}}),
    ("engine.compilation_config", {},  # the older spelling names it as a job file does now
     {"engine": {"extra_args": {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}}}),
    ("engine.dtype", {}, {"engine": {"dtype": "bfloat16"}}),
    ("chat_template_kwargs.thinking", {}, {"chat_template_kwargs": {"thinking": False}}),
    ("parsers.reasoning", {}, {"parsers": {"reasoning": "kimi_k2"}}),
    ("sampling.max_tokens", {}, {"sampling": {"max_tokens": 7}}),
    ("engine.model", {}, {"engine": {"model": "other"}}),
]


@pytest.mark.parametrize("field,base,change", COUNTED, ids=[c[0] for c in COUNTED])
def test_an_output_changing_field_changes_the_digest_and_is_named(
        field: str, base: dict, change: dict) -> None:
    old, new = _parts(base=base), _parts(change, base=base)
    assert digest(old) != digest(new)
    lines = describe_changes(old, new)
    assert lines and all(line.startswith(field) for line in lines), lines


SPEED_ONLY = [
    {"engine": {"max_in_flight": 3}},
    {"output": {"flush_rows": 5, "flush_seconds": 1, "compression": "snappy", "path": "o2"}},
    {"scale": {"workers": 4, "claim_ttl_s": 10}},
    {"storage": {"max_attempts": 3, "endpoint_url": "http://127.0.0.1:5000"}},
    {"engine": {"enforce_eager": True, "gpu_memory_utilization": 0.5,
                "kv_cache_memory_bytes": 1 << 28}},
    {"engine": {"extra_args": {"enforce_eager": True, "gpu_memory_utilization": 0.5}}},
    {"engine": {"tensor_parallel_size": 8, "pipeline_parallel_size": 2}},
    {"engine": {"decode_context_parallel_size": 1}},  # its default: no part, as before
    {"name": "renamed"},
]


@pytest.mark.parametrize("change", SPEED_ONLY, ids=lambda c: next(iter(c)))
def test_a_speed_only_change_keeps_the_digest(change: dict) -> None:
    assert digest(_parts(change)) == digest(_parts())


def test_resume_refuses_a_changed_template_and_accepts_a_speed_change(tmp_path: Path) -> None:
    store = Storage()
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(10))
    job = deep_merge({"input": {"path": str(inputs)}, "engine": {"model": "m"},
                      "output": {"path": str(tmp_path / "out")}}, TEMPLATE)
    layout = OutputLayout(str(tmp_path / "out"), store)
    plan, _ = checkpoint.open_plan(layout, make_plan(load_job(inline=job), store))

    reworded = deep_merge(job, {"input": {"prompt_template": "Question: {{ prompt }}"}})
    with pytest.raises(ResumeRefused, match=r"input\.prompt_template: \"Q: \{\{ prompt \}\}\" "
                                            r"-> \"Question: \{\{ prompt \}\}\""):
        checkpoint.open_plan(layout, make_plan(load_job(inline=reworded), store))

    faster = deep_merge(job, {"engine": {"max_in_flight": 8, "enforce_eager": True},
                              "output": {"flush_rows": 2}, "scale": {"workers": 2, "shared_filesystem": True}})
    resumed_plan, resumed = checkpoint.open_plan(layout, make_plan(load_job(inline=faster), store))
    assert resumed and resumed_plan == plan


def test_a_dcp8_output_is_not_resumed_with_dcp1(tmp_path: Path) -> None:
    """DCP is another attention computation (with an open drift bug at long context, vLLM
    #41623), not only a split: the two Kimi presets' outputs do not mix. TP alone may
    change; DCP1 jobs keep the fingerprint they had when DCP was speed-only."""
    store = Storage()
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(4))
    job = {"input": {"path": str(inputs)}, "output": {"path": str(tmp_path / "out")},
           "engine": {"model": "m", "tensor_parallel_size": 8,
                      "decode_context_parallel_size": 8}}
    layout = OutputLayout(str(tmp_path / "out"), store)
    checkpoint.open_plan(layout, make_plan(load_job(inline=job), store))
    tp8 = deep_merge(job, {"engine": {"decode_context_parallel_size": 1}})
    with pytest.raises(ResumeRefused) as refused:
        checkpoint.open_plan(layout, make_plan(load_job(inline=tp8), store))
    assert "  - engine.decode_context_parallel_size: 8 -> 1\n" in str(refused.value)
    assert digest(_parts({"engine": {"tensor_parallel_size": 8}})) == digest(_parts())


def test_an_unset_rollout_adds_no_part_so_outputs_written_before_it_resume() -> None:
    """`rollout` came later (counts_when_set): unset, a job's parts are those it had before
    the section existed; set, its fields count like any other."""
    assert not [k for k in _parts() if k.startswith("rollout")]
    changes = describe_changes(_parts(), _parts({"rollout": {"tools": [{"python": "t.py"}]}}))
    assert [c.split(":")[0] for c in changes] == [
        "rollout.max_malformed_turns", "rollout.max_turns", "rollout.tool_timeout_s",
        "rollout.tools"]


def test_how_often_open_conversations_are_saved_changes_no_fingerprint() -> None:
    """Where a rerun resumes a conversation from changes none of its rows."""
    tools = [{"python": "t.py"}]
    assert "rollout.checkpoint_seconds" not in _parts({"rollout": {"tools": tools}})
    assert len({digest(_parts({"rollout": {"tools": tools, "checkpoint_seconds": every}}))
                for every in (None, 0, 10, 600)}) == 1


def test_rollout_context_counts_only_when_it_hides_results() -> None:
    """`rollout.context` came later: at its default (`stop`, what rollouts did before) a
    rollout's parts are those it had, so its outputs resume; hiding results changes rows
    and counts."""
    rollout = {"rollout": {"tools": [{"python": "t.py"}]}}
    stop = _parts(deep_merge(rollout, {"rollout": {"context": {"policy": "stop"}}}))
    assert stop == _parts(rollout)
    hide = _parts(deep_merge(rollout, {"rollout": {"context": {
        "policy": "hide_tool_results", "budget_tokens": 1000}}}))
    assert [c.split(":")[0] for c in describe_changes(stop, hide)] == [
        "rollout.context.budget_tokens", "rollout.context.keep_last",
        "rollout.context.policy"]


SECRET, ROTATED = "sk-live-0123456789abcdef", "sk-live-fedcba9876543210"


def _mcp(key: str, command: str = "server.py", host: str = "search") -> dict[str, Any]:
    """Tool sources holding secrets: a stdio server's env value, a URL's credentials."""
    return {"rollout": {"tools": [
        {"mcp": {"command": ["python", command], "env": {"API_KEY": key, "MODE": "fast"}}},
        {"mcp": {"url": f"https://bot:{key}@{host}:8000/mcp?token={key}&region=eu"}}]}}


def test_mcp_secrets_count_for_nothing_and_are_written_nowhere(tmp_path: Path) -> None:
    """A rotated key is the same job (a resume goes on); the server, its host and its env
    names still count. Neither the plan's fingerprint parts nor the manifest's config
    hold a secret: both are JSON dumps, where the schema masks them."""
    store = Storage()
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(4))
    base = {"input": {"path": str(inputs)}, "engine": {"model": "m"},
            "output": {"path": str(tmp_path / "out")}}
    layout = OutputLayout(str(tmp_path / "out"), store)
    job = load_job(inline=deep_merge(base, _mcp(SECRET)))
    plan, _ = checkpoint.open_plan(layout, make_plan(job, store))

    rotated = load_job(inline=deep_merge(base, _mcp(ROTATED)))
    assert checkpoint.open_plan(layout, make_plan(rotated, store)) == (plan, True)
    for other in (_mcp(SECRET, command="other.py"), _mcp(SECRET, host="elsewhere")):
        with pytest.raises(ResumeRefused, match=r"rollout\.tools: "):
            checkpoint.open_plan(layout, make_plan(load_job(inline=deep_merge(base, other)),
                                                   store))
    manifest = build_manifest(rotated, plan, layout, {}, RunFigures())
    written = [(tmp_path / "out" / "_plan.json").read_text(), manifest.to_json().decode()]
    assert not [text for text in written if SECRET in text or ROTATED in text]
    assert ("https://**********@search:8000/mcp?token=**********&region=**********"
            in written[0].replace("\\", ""))
    assert manifest.config["rollout"]["tools"][0]["mcp"]["env"] == {"API_KEY": "**********",
                                                                    "MODE": "**********"}


# The compatibility contract: parts as the code before the flat engine spelling computed
# them (`dtype`, `quantization`, `load_format` fields of EngineSpec; every other vLLM
# argument under `engine.extra_args`), for FILES. An output written then resumes only if
# the same job gives the same parts now, however it spells its engine arguments.
BEFORE_FLAT = {
    "input.files": "00bbc1b73b478474", "input.id_column": "null",
    "input.messages_column": "null", "input.prompt_column": '"prompt"',
    "input.prompt_template": "null", "input.system_prompt": "null",
    "input.sampling_column": "null", "input.tools_column": "null",
    "input.chat_template_kwargs_column": "null", "input.sample_index_column": "null",
    "input.status_column": "null", "input.error_column": "null",
    "input.passthrough_columns": "[]", "input.allow_special_tokens": "false",
    "shards.rows_per_shard": "1000", "engine.kind": '"vllm"', "engine.model": '"m"',
    "engine.tokenizer": "null", "engine.revision": "null", "engine.max_model_len": "null",
    "engine.trust_remote_code": "false", "engine.dtype": '"auto"',
    "engine.quantization": "null", "engine.load_format": '"auto"', "engine.seed": "0",
    "engine.replay_column": '"raw_text"', "sampling.temperature": "1.0",
    "sampling.top_p": "1.0", "sampling.top_k": "0", "sampling.min_p": "0.0",
    "sampling.max_tokens": "1024", "sampling.min_tokens": "0", "sampling.seed": "null",
    "sampling.stop": "[]", "sampling.presence_penalty": "0.0",
    "sampling.frequency_penalty": "0.0", "sampling.repetition_penalty": "1.0",
    "sampling.ignore_eos": "false", "sampling.n": "1", "sampling.structured_outputs": "null",
    "tools": "null", "parsers.reasoning": "null", "parsers.tool_call": "null",
    "output.keep_raw_text": "false", "retry": "null"}
ARGS = {"compilation_config": {"custom_ops": ["-rotary_embedding"], "level": 0},
        "block_size": 32, "enforce_eager": True, "max_num_seqs": 8, "tokenizer_mode": "slow"}
FORMER = {"dtype": "bfloat16", "quantization": "fp8", "load_format": "dummy",
          "kv_cache_memory_bytes": 1 << 28}
CONTRACT = [  # (name, engine as written now, as written before, other sections, parts
    #           beside BEFORE_FLAT's, digest)
    ("default", {}, {}, {}, {},
     "a3f7bd4896a8c83dcbf19ad463935325b8e2758e9f53d9bdf9d5f13f679c82ae"),
    ("engine args", ARGS, {"extra_args": ARGS}, {},
     {"engine.extra_args.compilation_config.custom_ops": '["-rotary_embedding"]',
      "engine.extra_args.compilation_config.level": "0",
      "engine.extra_args.block_size": "32", "engine.extra_args.tokenizer_mode": '"slow"'},
     "295b5fa266fb37de504a4abdbaf25c78bd8debd64016b3ef39c9998f68902e39"),
    ("former fields", FORMER, FORMER, {},
     {"engine.dtype": '"bfloat16"', "engine.quantization": '"fp8"',
      "engine.load_format": '"dummy"'},
     "a7ee7c467022f7687f42587d014d0e478df6b2b129689def163e8f446e459700"),
    ("rollout", {}, {}, {"rollout": {"tools": [{"python": "t.py"}], "max_turns": 3,
                                     "max_tool_error_rate": 0.5}},
     {"rollout.max_turns": "3", "rollout.tool_timeout_s": "30.0",
      "rollout.max_malformed_turns": "3",
      "rollout.tools": '[{"functions":null,"mcp":null,"python":"t.py","recorded":null}]'},
     "458c81ee534320fea6e57491940acf81a0b4f5f261e8231288faad4743cae5e0"),
    ("dcp8", {"tensor_parallel_size": 8, "decode_context_parallel_size": 8},
     {"tensor_parallel_size": 8, "decode_context_parallel_size": 8}, {},
     {"engine.decode_context_parallel_size": "8"},
     "f7462b16e3dbbb93e510549c99eb74f26847570e66c50d9e23175821821612cd"),
]


@pytest.mark.parametrize("now,before,sections,parts,expected", [c[1:] for c in CONTRACT],
                         ids=[c[0] for c in CONTRACT])
def test_outputs_written_before_the_flat_engine_spelling_resume(
        now: dict, before: dict, sections: dict, parts: dict, expected: str) -> None:
    for engine in (now, before):
        got = _parts({"engine": engine, **sections})
        assert got == {**BEFORE_FLAT, **parts}
        assert digest(got) == expected


# The demos' digests before the flat spelling: their presets moved to it.
DEMOS = {"demo": "dd10ce22f5014f935f78cd441962e38026b329e65c1ad42f0eb69b2ef451c9d3",
         "demo-random": "2db0776731c352e93e835a2245a4a14e2a904d5ba786c3923804dba34a6c1eeb",
         "features": "2ebee33dd7ae59b6918d067dc064d14de54edacda0e7dcaa2109309a7be2bdce",
         "demo-rollout": "370f5fda8405b53f706339d960cf1ea7c3c72fe434782ced628b2a2d619d7a8c"}


def test_the_demos_outputs_written_before_the_flat_spelling_resume() -> None:
    examples = Path(__file__).resolve().parents[3] / "examples"
    got = {name: digest(fingerprint_parts(load_job(examples / f"{name}.yaml"), FILES))
           for name in DEMOS}
    assert got == DEMOS


def test_every_listed_path_names_a_field_or_an_engine_argument() -> None:
    """A misspelt entry would leave what it meant counted, silently."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    vllm_args = {f.name for f in dataclasses.fields(EngineArgs)}
    for path in job_schema.SPEED_ONLY | job_schema.COUNTS_WHEN_SET:
        *sections, last = path.split(".")
        kind: Any = JobSpec
        for section in sections:
            kind = kind.model_fields[section].annotation
            kind = next((a for a in getattr(kind, "__args__", ()) if a is not type(None)),
                        kind)
        assert last in kind.model_fields or (kind is EngineSpec and last in vllm_args), path
