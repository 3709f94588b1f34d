"""Ray Data LLM over a thinkbatch job's rows: the peer a user would pick instead.

    PYTHONPATH=.bench-peers python benchmarks/ray_llm.py SPEC.json RESULT.json

SPEC names the thinkbatch job file (rows, engine section, sampling) and Ray's settings:
`batch_size`, `max_concurrent_batches` (absent: Ray's defaults), `checkpoint` (a folder:
Ray Data's checkpointing by the job's id column, as its docs set it up),
`min_rows_per_file` and `rows_per_block` (the write's and the engine tasks' sizes),
`continue_on_error` (`should_continue_on_error`), `postprocess` ("kimi": the columns a
user gets from vLLM's Kimi-K2 parsers, KimiParse; "kimi+raw": with every column Ray
writes; else Ray's columns alone). Engine arguments come from the job through
thinkbatch's own `machine_kwargs`, and SamplingParams fields from its sampling section as
thinkbatch builds them (tasks/rows/sampling.py `sampling_kwargs`), so both sides run the same engine and the
same requests. Ray is installed beside the product, never in it (`make bench-peers`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.time()  # before the imports: the user's wall time counts them
os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


LIGHT_CPU = 0.25  # logical CPUs of each light Ray Data task or actor (see main)


class KimiParse:
    """The extra stage a Ray user writes to get the columns thinkbatch writes: reasoning,
    answer and tool calls split out of the raw Kimi-K2 text with vLLM's own parsers (what
    `vllm serve --reasoning-parser kimi_k2 --tool-call-parser kimi_k2` runs).

    A callable class, so Ray starts its actor with the pipeline and loading vLLM, the
    tokenizer and the parsers overlaps the engine's load (as a `postprocess` function
    the first block waited ~13 s for a fresh worker to import them). The request must
    say tool_choice="auto": a plain ChatCompletionRequest without tools defaults to
    "none", and every tool call is silently dropped. Ray keeps no finish reason, so a
    completion cut at max_tokens passes for a whole one; a parser that raises would
    fail the whole dataset, hence the try."""

    def __init__(self, model: str, keep_raw: bool = False):
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest,
        )
        from vllm.parser.parser_manager import ParserManager
        from vllm.tokenizers import get_tokenizer

        self.tokenizer = get_tokenizer(model)
        self.parser = ParserManager.get_parser(
            tool_parser_name="kimi_k2", reasoning_parser_name="kimi_k2",
            enable_auto_tools=True, model_name=model, tokenizer=self.tokenizer)
        self.request = ChatCompletionRequest.model_construct(
            model=model, messages=[], tools=None, tool_choice="auto", include_reasoning=True)
        self.keep_raw = keep_raw  # Ray's own columns too (to show what Ray writes)

    def parse(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"id": row["id"], "reasoning": None, "answer": None, "tool_calls": None,
               "parse_error": None, "completion_tokens": row["num_generated_tokens"],
               "metrics": row["metrics"],  # Ray's timings, kept as they come
               "__inference_error__": row.get("__inference_error__")}
        if self.keep_raw:
            out = {**row, **out}
        if out["__inference_error__"]:
            return out
        try:
            out["reasoning"], out["answer"], calls = self.parser(self.tokenizer, None).parse(
                row["generated_text"], self.request, enable_auto_tools=True)
            if calls:
                out["tool_calls"] = json.dumps([{"name": c.name, "arguments": c.arguments}
                                                for c in calls])
        except Exception as e:
            out["parse_error"] = f"{type(e).__name__}: {e}"
        return out

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist([self.parse(r) for r in batch.to_pylist()])


def _checkpoint(path: str | None, id_column: str) -> None:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    if path:
        ray.data.DataContext.get_current().checkpoint_config = CheckpointConfig(
            id_column=id_column, checkpoint_path=path)


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import ray
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from thinkbatch.schemas.job import JobSpec, SamplingSpec
    from thinkbatch.tasks.rows.engine import machine_kwargs
    from thinkbatch.tasks.rows.engine_settings import engine_args_kwargs, may_seed
    from thinkbatch.tasks.rows.sampling import keep_special, sampling_kwargs

    job = JobSpec.model_validate(json.loads(Path(spec["job"]).read_text()))
    kwargs, _ = machine_kwargs(job.engine, job.parsers, may_seed(job))
    engine_kwargs = engine_args_kwargs(kwargs)  # Ray builds EngineArgs from them
    model = engine_kwargs.pop("model")
    keep = keep_special(job)
    defaults = job.sampling.model_dump(by_alias=True)
    system = ([{"role": "system", "content": job.input.system_prompt}]
              if job.input.system_prompt else [])
    sampling_col = job.input.sampling_column

    built: dict[str | None, dict[str, Any]] = {}

    def sampling(row: dict[str, Any]) -> dict[str, Any]:
        """The row's SamplingParams fields: the job's section or the row's override,
        with thinkbatch's per-row seed (seed + row index; the benchmark's ids are
        q<row index>)."""
        over = row.get(sampling_col) if sampling_col else None
        if over not in built:
            s = (SamplingSpec.model_validate({**defaults, **json.loads(over)}) if over
                 else job.sampling)
            built[over] = sampling_kwargs(s, keep)
        fields = dict(built[over])
        if fields.get("seed") is not None:
            fields["seed"] += int(row[job.input.id_column][1:])
        return fields

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        user = {"role": "user", "content": row[job.input.prompt_column]}
        return {"messages": [*system, user], "sampling_params": sampling(row)}

    knobs = {k: spec[k] for k in ("batch_size", "max_concurrent_batches")
             if spec.get(k) is not None}
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        log_engine_metrics=False,  # vLLM's Ray metrics import Ray Serve
        placement_group_config={"bundles": [{"CPU": 1}]},
        should_continue_on_error=bool(spec.get("continue_on_error")),
        # Every CPU stage holds a whole logical CPU by default: on 2 cores the chat
        # template actor and the engine's bundle take both, and the file listing (one
        # CPU, not configurable) never runs: a silent hang. The chat template actor
        # (with the preprocess fused into it) holds none here, reads and writes a
        # fraction; the tokenize and detokenize stages are off: vLLM tokenizes and
        # detokenizes itself, and Ray's detokenize stage decodes with
        # skip_special_tokens=True, deleting Kimi's markers.
        chat_template_stage={"num_cpus": 0},
        tokenize_stage=False,
        detokenize_stage=False,
        **knobs,
    )
    # Ray Data's checkpoint filter actor reserves a whole logical CPU (not configurable):
    # with the engine's bundle and the file listing, two would deadlock on a resume.
    # Logical CPUs only gate Ray's scheduling; vLLM binds its threads the same either way.
    cpus = os.cpu_count() + (1 if spec.get("checkpoint") else 0)
    ray.init(num_cpus=cpus, num_gpus=0, include_dashboard=False,
             object_store_memory=spec.get("object_store_bytes", 1 << 30),
             _temp_dir=spec.get("ray_temp_dir"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    _checkpoint(spec.get("checkpoint"), job.input.id_column)
    light = {"num_cpus": LIGHT_CPU}
    processor = build_processor(config, preprocess=preprocess,
                                preprocess_map_kwargs={"num_cpus": 0},
                                postprocess_map_kwargs=light)
    ready = time.time()
    ds = ray.data.read_parquet(job.input.path, num_cpus=LIGHT_CPU)
    if spec.get("rows_per_block"):  # else a whole input block is one engine task
        ds = ds.repartition(target_num_rows_per_block=spec["rows_per_block"])
    ds = processor(ds)
    if spec.get("postprocess") in ("kimi", "kimi+raw"):
        keep_raw = spec["postprocess"] == "kimi+raw"
        ds = ds.map_batches(KimiParse, fn_constructor_kwargs={"model": model,
                                                              "keep_raw": keep_raw},
                            batch_format="pyarrow", batch_size=None, concurrency=1,
                            num_cpus=0)
    error = None
    try:
        ds.write_parquet(spec["out"], ray_remote_args=light,
                         min_rows_per_file=spec.get("min_rows_per_file"))
    except Exception as e:  # what a bad row does to the job: reported, not hidden
        error = f"{type(e).__name__}: {str(e)[-6000:]}"
    done = time.time()
    result = {"started": STARTED, "processor_built": ready, "write_returned": done,
              "error": error, "config": {"batch_size": config.batch_size,
                                         "max_concurrent_batches": config.max_concurrent_batches,
                                         "checkpoint": spec.get("checkpoint")}}
    Path(result_path).write_text(json.dumps(result, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
