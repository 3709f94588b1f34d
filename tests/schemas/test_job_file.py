from __future__ import annotations

from pathlib import Path

import pytest

from thinkbatch.schemas.job_file import JobFileError, load_job

MINIMAL = {
    "input": {"path": "in.parquet"},
    "engine": {"model": "some/model"},
    "output": {"path": "out"},
}


def test_minimal_job_gets_defaults() -> None:
    job = load_job(inline=MINIMAL)
    assert job.input.prompt_column == "prompt"
    assert job.engine.tensor_parallel_size == 1
    assert job.shards.rows_per_shard == 1000


def test_every_error_is_reported_at_once() -> None:
    bad = {
        "input": {"path": "x", "messages_column": "m", "prompt_column": "p"},
        "engine": {"model": "m", "tensor_parallel_size": 8, "decode_context_parallel_size": 3,
                   "max_in_flight": 0},
        "sampling": {"temperature": -1, "unknown_knob": 3},
        "output": {},
    }
    with pytest.raises(JobFileError) as e:
        load_job(inline=bad)
    text = "\n".join(e.value.errors)
    for needle in ("set one of messages_column, prompt_column", "divisible by",
                   "max_in_flight", "temperature", "unknown_knob", "output.path"):
        assert needle in text, needle
    assert len(e.value.errors) >= 6


def test_set_overrides_and_yaml_values() -> None:
    job = load_job(inline=MINIMAL, sets=["engine.max_in_flight=7", "sampling.stop=[a, b]",
                                         "chat_template_kwargs.thinking=false"])
    assert job.engine.max_in_flight == 7
    assert job.sampling.stop == ["a", "b"]
    assert job.chat_template_kwargs == {"thinking": False}


def test_malformed_set_is_refused() -> None:
    with pytest.raises(JobFileError, match="KEY.PATH=VALUE"):
        load_job(inline=MINIMAL, sets=["engine.max_in_flight"])


def test_reference_preset_is_tp8_dcp8_with_kimi_parsers() -> None:
    job = load_job(inline={k: v for k, v in MINIMAL.items() if k != "engine"},
                   preset="kimi-k2-thinking")
    e = job.engine
    assert (e.model, e.tensor_parallel_size, e.decode_context_parallel_size) == (
        "moonshotai/Kimi-K2-Thinking", 8, 8)
    assert e.trust_remote_code and e.max_model_len == 262144
    assert (job.parsers.reasoning, job.parsers.tool_call) == ("kimi_k2", "kimi_k2")
    assert job.sampling.temperature == 1.0


def test_tp8_preset_inherits_and_drops_dcp(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("preset: kimi-k2-thinking-tp8\ninput: {path: a}\noutput: {path: b}\n")
    job = load_job(path)
    assert job.engine.tensor_parallel_size == 8
    assert job.engine.decode_context_parallel_size == 1
    assert job.parsers.tool_call == "kimi_k2"


def test_job_file_values_win_over_preset() -> None:
    job = load_job(inline={**MINIMAL, "engine": {"max_model_len": 4096}},
                   preset="kimi-k2-thinking")
    assert job.engine.max_model_len == 4096
    assert job.engine.tensor_parallel_size == 8


def test_vllm_engine_arguments_are_written_flat_and_passed_as_they_are() -> None:
    """Beside thinkbatch's own engine fields, any key is a vLLM engine argument (its name is
    checked against vLLM's EngineArgs by check_vllm, which imports vLLM)."""
    args = {"dtype": "bfloat16", "enforce_eager": True,
            "compilation_config": {"custom_ops": ["-rotary_embedding"]}}
    job = load_job(inline={**MINIMAL, "engine": {"model": "m", "max_in_flight": 8, **args}})
    assert job.engine.vllm_args == args
    assert job.engine.max_in_flight == 8 and "max_in_flight" not in job.engine.vllm_args


def test_the_older_extra_args_spelling_is_still_read() -> None:
    """`extra_args` joins the flat arguments, file by file: a job's older spelling still
    overrides its preset's flat argument. A key given both ways in one file is refused."""
    job = load_job(inline={**MINIMAL, "preset": "cpu-miniature", "engine": {
        "model": "m", "extra_args": {"enforce_eager": False, "block_size": 32}}})
    assert job.engine.vllm_args == {"kv_cache_memory_bytes": 268435456,
                                    "enforce_eager": False, "block_size": 32}
    with pytest.raises(JobFileError) as e:
        load_job(inline={**MINIMAL, "engine": {"model": "m", "dtype": "half",
                                               "extra_args": {"dtype": "bfloat16"}}})
    [error] = e.value.errors
    assert "engine.extra_args.dtype is also given as engine.dtype: give it once" in error


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(JobFileError, match="kimi-k2-thinking"):
        load_job(inline=MINIMAL, preset="nope")


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="does not exist"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(JobFileError, match="mapping"):
        load_job(tmp_path / "list.yaml")
