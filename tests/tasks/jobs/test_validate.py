"""Checks before any model loads: every input file's footer, the output path, the job's
tools, all reported at once. Real Parquet files in tmp_path; no engine."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (TIKTOKEN_MODEL, TOKENIZERS, TRAINED_MODEL, prompt_rows,
                            tokenizer_engine, write_prompts)
from thinkbatch.schemas.job_file import JobFileError, load_job
from thinkbatch.tasks.jobs.validate import check_inputs, check_job, checked_job
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage


def _inputs(tmp_path: Path, second: list[dict[str, Any]] | bytes) -> Path:
    """A good first file and the given second file (rows, or raw bytes)."""
    folder = tmp_path / "in"
    write_prompts(folder / "part-0.parquet", prompt_rows(5))
    if isinstance(second, bytes):
        (folder / "part-1.parquet").write_bytes(second)
    else:
        write_prompts(folder / "part-1.parquet", second)
    return folder


def _job(inputs: Path | str, out: Path | str, **sections: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "input": {"path": str(inputs), "id_column": "id", "prompt_column": "prompt",
                  "passthrough_columns": ["topic"]},
        "engine": {"model": "m"},
        "output": {"path": str(out)},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def _errors(job: dict[str, Any]) -> list[str]:
    return check_job(load_job(inline=job))


def test_a_corrupt_later_file_is_named(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, b"PAR1 this is not parquet")
    errors = _errors(_job(inputs, tmp_path / "out"))
    assert len(errors) == 1, errors
    assert f"{inputs / 'part-1.parquet'} is not readable Parquet" in errors[0]


@pytest.mark.parametrize("column, engine", [("prompt", {"model": "m"}),
                                            ("raw_text", {"kind": "replay"})])
def test_a_needed_column_missing_from_a_later_file_is_named(tmp_path: Path, column: str,
                                                            engine: dict[str, Any]) -> None:
    first = [{**r, "raw_text": "<think>a</think>b"} for r in prompt_rows(5)]
    second = [{k: v for k, v in r.items() if k != column} for r in first]
    folder = tmp_path / "in"
    write_prompts(folder / "part-0.parquet", first)
    write_prompts(folder / "part-1.parquet", second)
    errors = _errors(_job(folder, tmp_path / "out", engine=engine))
    assert len(errors) == 1, errors
    assert f"column {column!r} is missing from {folder / 'part-1.parquet'}" in errors[0]


def test_column_types_must_agree_across_files(tmp_path: Path) -> None:
    second = [{"id": "x1", "prompt": "p", "topic": 7}]
    inputs = _inputs(tmp_path, second)
    errors = _errors(_job(inputs, tmp_path / "out"))
    assert len(errors) == 1, errors
    assert (f"column 'topic' is int64 in {inputs / 'part-1.parquet'} but string in "
            f"{inputs / 'part-0.parquet'}; a passthrough column keeps the first file's type"
            in errors[0])


def test_a_prompt_column_must_be_text_in_every_file(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, [{"id": "x1", "prompt": 12, "topic": "t"}])
    errors = _errors(_job(inputs, tmp_path / "out"))
    assert len(errors) == 1, errors
    assert f"column 'prompt' is int64 in {inputs / 'part-1.parquet'}" in errors[0]


def test_all_null_later_columns_and_binary_prompts_are_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_prompts(folder / "part-0.parquet", prompt_rows(5))
    pq.write_table(pa.table({"id": ["x1"], "prompt": pa.array([b"p"], pa.binary()),
                             "topic": pa.nulls(1)}), folder / "part-1.parquet")
    assert _errors(_job(folder, tmp_path / "out")) == []


def test_passthrough_columns_may_not_clash_with_output_columns(tmp_path: Path) -> None:
    rows = [{**r, "status": "draft"} for r in prompt_rows(5)]
    inputs = write_prompts(tmp_path / "in.parquet", rows)
    errors = _errors(_job(inputs, tmp_path / "out",
                          input={"passthrough_columns": ["topic", "status"]}))
    assert errors == ["input.passthrough_columns: ['status'] are also output columns; an "
                      "output row cannot hold both"]


def test_an_unknown_compression_is_refused(tmp_path: Path) -> None:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(5))
    assert _errors(_job(inputs, tmp_path / "out", output={"compression": "lz4"})) == []
    errors = _errors(_job(inputs, tmp_path / "out", output={"compression": "zstandard"}))
    assert len(errors) == 1 and errors[0].startswith("output.compression: 'zstandard'"), errors


def test_an_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(5))
    (tmp_path / "out").write_text("a file")
    errors = _errors(_job(inputs, tmp_path / "out"))
    assert errors == [f"output.path: {str(tmp_path / 'out')!r} is an existing file; the "
                      "output is a folder"]


def test_an_output_inside_the_input_folder_is_refused(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, prompt_rows(3, start=100))
    errors = _errors(_job(inputs, inputs / "out"))
    assert errors == [f"output.path: {str(inputs / 'out')!r} lies inside the input path "
                      f"{str(inputs)!r}: its Parquet parts would be read as inputs"]
    # Beside the input, or under a folder a non-recursive glob does not reach: fine.
    assert _errors(_job(inputs, tmp_path / "out")) == []
    assert _errors(_job(f"{inputs}/*.parquet", inputs / "out")) == []
    assert len(_errors(_job(f"{inputs}/**/*.parquet", inputs / "out"))) == 1


def test_an_output_under_the_input_s3_prefix_is_refused(s3, tmp_path: Path) -> None:
    bucket = s3.bucket("validate")
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(prompt_rows(5)), sink)
    s3.client().put_object(Bucket=bucket, Key="in/part-0.parquet", Body=sink.getvalue())
    errors = _errors(_job(f"s3://{bucket}/in", f"s3://{bucket}/in/out"))
    assert errors == [f"output.path: 's3://{bucket}/in/out' lies inside the input path "
                      f"'s3://{bucket}/in': its Parquet parts would be read as inputs"]
    assert _errors(_job(f"s3://{bucket}/in", f"s3://{bucket}/out")) == []


def test_malformed_job_tools_are_refused(tmp_path: Path) -> None:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(5))
    good = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    assert _errors(_job(inputs, tmp_path / "out", tools=[good])) == []
    bad = [good,
           {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}},
           {"function": {"name": "g"}},
           {"type": "function", "function": {"parameters": {}}}]
    errors = _errors(_job(inputs, tmp_path / "out", tools=bad))
    assert [e.split(":")[0] for e in errors] == [
        "tools[1].function.parameters.type", "tools[2]", "tools[3].function.name"], errors


def test_schema_errors_come_with_every_other_check_in_one_error(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, b"not parquet at all")
    job = _job(inputs, tmp_path / "out", sampling={"temperature": -1},
               parsers={"reasoning": "no_such_parser"}, output={"compression": "nope"})
    with pytest.raises(JobFileError) as e:
        checked_job(lambda: load_job(inline=job))
    where = [err.split(":")[0] for err in e.value.errors]
    assert where[0] == "sampling.temperature"
    assert {"input.path", "output.compression", "parsers.reasoning"} <= set(where), where
    assert "part-1.parquet is not readable Parquet" in str(e.value)


def test_a_prompt_template_that_does_not_compile_is_reported_with_the_other_errors(
        tmp_path: Path) -> None:
    """A syntax error, and an unknown filter or test even where Jinja would only find it
    while rendering (inside a block), come in the same answer as an unreadable input."""
    inputs = _inputs(tmp_path, b"not parquet at all")
    for template, expected in [
            ("Weather in {{ city }", "input.prompt_template: unexpected '}'"),
            ("{% if city %}{{ city | shout }}{% endif %}",
             "input.prompt_template: no filter named 'shout' (line 1)"),
            ("{% if city is loud %}{{ city }}{% endif %}",
             "input.prompt_template: no test named 'loud' (line 1)")]:
        job = _job(inputs, tmp_path / "out",
                   input={"prompt_column": None, "prompt_template": template})
        with pytest.raises(JobFileError) as e:
            checked_job(lambda: load_job(inline=job))
        assert [err for err in e.value.errors if err.startswith(expected)], e.value.errors
        assert "part-1.parquet is not readable Parquet" in str(e.value)


def test_an_id_column_of_a_list_type_is_refused(tmp_path: Path) -> None:
    """Ids are read as text: a list (or struct) id would fail the run at its first batch."""
    listed = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"id": [["x", "1"]], "prompt": ["p"], "topic": ["t"]}), listed)
    errors = _errors(_job(listed, tmp_path / "out"))
    assert errors == [f"input: column 'id' is list<element: string> in {listed}; an id "
                      "column must be a scalar that reads as text (string, integer, ...)"]
    numbers = write_prompts(tmp_path / "n.parquet", [{**r, "id": i} for i, r in
                                                     enumerate(prompt_rows(2))])
    assert _errors(_job(numbers, tmp_path / "out")) == []


@pytest.mark.parametrize("older", [False, True], ids=["flat", "extra_args"])
def test_unknown_engine_args_are_reported_beside_another_engine_error(
        tmp_path: Path, older: bool) -> None:
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    args = {"enforce_eager": True, "not_an_engine_arg": 1}
    job = _job(inputs, tmp_path / "out", engine={
        "model": "m", "tensor_parallel_size": 8, "decode_context_parallel_size": 3,
        **({"extra_args": args} if older else args)})
    with pytest.raises(JobFileError) as e:
        checked_job(lambda: load_job(inline=job))
    where = [err.split(":")[0] for err in e.value.errors]
    assert where == ["engine.decode_context_parallel_size",
                     "engine.not_an_engine_arg"], e.value.errors


def test_a_misspelt_engine_field_is_refused_with_the_name_meant(tmp_path: Path) -> None:
    """A key under `engine:` is thinkbatch's field or vLLM's argument; a typo of either is
    neither, and is refused before any model loads."""
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    errors = _errors(_job(inputs, tmp_path / "out",
                          engine={"max_inflight": 8, "enforce_eagre": True}))
    assert errors == [
        "engine.max_inflight: not a vLLM engine argument, nor a field of thinkbatch's "
        "engine section; did you mean engine.max_in_flight?",
        "engine.enforce_eagre: not a vLLM engine argument, nor a field of thinkbatch's "
        "engine section; did you mean engine.enforce_eager?"]


def test_planning_reuses_the_footers_validation_read(tmp_path: Path) -> None:
    class CountingStorage(Storage):
        opened: list[str] = []

        def open_parquet(self, path: str) -> pq.ParquetFile:
            self.opened.append(path)
            return super().open_parquet(path)

    inputs = _inputs(tmp_path, prompt_rows(3, start=100))
    store = CountingStorage()
    job = load_job(inline=_job(inputs, tmp_path / "out"))
    assert check_inputs(job, store) == []
    assert make_plan(job, store).total_rows == 8
    assert sorted(store.opened) == [str(inputs / "part-0.parquet"),
                                    str(inputs / "part-1.parquet")]


def test_scale_out_refuses_mcp_secrets_the_workers_would_not_get(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """K workers get the job as Prefect parameters, a JSON dump where secrets are masked:
    a literal secret is refused up front (the workers would start the server with the
    mask); one named from the environment (`${VAR}`) reaches each worker from its own."""
    monkeypatch.setenv("TB_TEST_TOKEN", "tok-123456789")
    write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    server = ["python", str(Path(__file__).resolve().parents[2] / "mcp_counting_server.py")]

    def job(env: dict[str, str]) -> dict[str, Any]:
        return _job(tmp_path / "in.parquet", tmp_path / "out", parsers={"tool_call": "kimi_k2"},
                    scale={"workers": 2, "shared_filesystem": True},
                    rollout={"tools": [{"mcp": {"command": server, "env": env}}]})

    starts = str(tmp_path / "starts")
    assert _errors(job({"STARTS_FILE": starts, "API_KEY": "sk-literal-123"})) == [
        f"rollout.tools[0].mcp.env.{k}: with scale.workers > 1 a secret reaches the workers "
        "only from their environment: write it as ${VAR}" for k in ("STARTS_FILE", "API_KEY")]
    monkeypatch.setenv("TB_TEST_STARTS", starts)
    assert _errors(job({"STARTS_FILE": "${TB_TEST_STARTS}", "API_KEY": "${TB_TEST_TOKEN}"})) == []


def _tokenizer_copy(source: Path, to: Path) -> Path:
    """A model folder's tokenizer files (no weights) to edit."""
    to.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, to / f.name)
    return to


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_a_tokenizer_without_a_marker_the_parsers_need_is_refused(tmp_path: Path,
                                                                  tokenizer: str) -> None:
    """kimi_k2 looks for `</think>` as one token id; a tokenizer of either class that lacks
    it is refused, the marker named; the same folder with it is accepted."""
    engine = tokenizer_engine(tokenizer)
    folder = _tokenizer_copy(Path(engine["model"]), tmp_path / "model")
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    job = _job(inputs, tmp_path / "out", engine={**engine, "model": str(folder)},
               parsers={"reasoning": "kimi_k2", "tool_call": "kimi_k2"})
    assert _errors(job) == []
    if tokenizer == "hf":  # the added token gone from tokenizer.json
        data = json.loads((folder / "tokenizer.json").read_text())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</think>"]
        (folder / "tokenizer.json").write_text(json.dumps(data))
    else:  # gone from the added_tokens_decoder that fills tiktoken's special table
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]["1022"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    errors = _errors(job)
    assert len(errors) == 1 and errors[0].startswith("parsers: "), errors
    assert "'</think>' as one token" in errors[0] and "<think>'" not in errors[0], errors


def test_a_tokenizer_shipped_as_code_needs_trust_remote_code(tmp_path: Path) -> None:
    """Kimi's layout: tokenizer_config.json names the class (auto_map), no tokenizer.json.
    Without trust_remote_code transformers would build another tokenizer in its place
    (tests/miniature/test_tiktoken_tokenizer.py), so the job is refused, the flag named."""
    inputs = write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    folder = _tokenizer_copy(TIKTOKEN_MODEL, tmp_path / "model")

    def errors(trust: bool) -> list[str]:
        return _errors(_job(inputs, tmp_path / "out", parsers={"reasoning": "kimi_k2"},
                            engine={"model": str(folder), "trust_remote_code": trust}))

    (refused,) = errors(False)
    assert refused.startswith("engine.trust_remote_code: ")
    assert "tokenization_tiny_kimi.TikTokenTokenizer" in refused
    assert errors(True) == []
    # A tokenizer.json beside it is what transformers loads without the code: accepted.
    shutil.copyfile(TRAINED_MODEL / "tokenizer.json", folder / "tokenizer.json")
    assert errors(False) == []


def test_scale_out_refuses_a_local_output_no_worker_host_was_said_to_share(
        tmp_path: Path) -> None:
    """Workers on other hosts would find no plan in a folder of the parent's host (they
    failed reading it, after their model loaded): refused up front, unless the user says
    every worker sees the folder."""
    write_prompts(tmp_path / "in.parquet", prompt_rows(2))
    local = _job(tmp_path / "in.parquet", tmp_path / "out", scale={"workers": 2})
    errors = _errors(local)
    assert len(errors) == 1 and errors[0].startswith("output.path: ") \
        and "scale.workers is 2" in errors[0] and "shared_filesystem" in errors[0], errors
    assert _errors({**local, "scale": {"workers": 2, "shared_filesystem": True}}) == []
    assert _errors({**local, "scale": {"workers": 1}}) == []
