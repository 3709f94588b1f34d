from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import prompt_rows, write_prompts
from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.rows.read import ROW_ID, ROW_INDEX, shard_batches
from thinkbatch.tasks.store.plan import make_plan
from thinkbatch.tasks.store.storage import Storage

STORE = Storage()


def _job(inputs: Path, rows_per_shard: int, **inp):
    return load_job(inline={"input": {"path": str(inputs), **inp},
                            "shards": {"rows_per_shard": rows_per_shard},
                            "engine": {"model": "m"}, "output": {"path": "o"}})


def _three_files(tmp_path: Path) -> Path:
    for k, n in enumerate((70, 5, 130)):
        write_prompts(tmp_path / "in" / f"part-{k}.parquet", prompt_rows(n, start=1000 * k),
                      row_group_size=32)
    return tmp_path / "in"


def test_shards_are_fixed_size_span_files_and_are_deterministic(tmp_path: Path) -> None:
    inputs = _three_files(tmp_path)
    plan = make_plan(_job(inputs, 50), STORE)
    assert plan.total_rows == 205
    assert [s.num_rows for s in plan.shards] == [50, 50, 50, 50, 5]
    assert [(g.file, g.start, g.stop) for g in plan.shards[1].segments] == [
        (0, 50, 70), (1, 0, 5), (2, 0, 25)]
    assert make_plan(_job(inputs, 50), STORE) == plan


def test_shard_rows_cover_every_row_once_in_order(tmp_path: Path) -> None:
    inputs = _three_files(tmp_path)
    job = _job(inputs, 50, id_column="id")
    plan = make_plan(job, STORE)
    seen_idx, seen_ids = [], []
    for shard in plan.shards:
        for batch in shard_batches(STORE, plan, shard, ["id", "prompt"], "id", batch_size=7):
            seen_idx += batch.column(ROW_INDEX).to_pylist()
            seen_ids += batch.column(ROW_ID).to_pylist()
    expected = [r["id"] for k in range(3)
                for r in pq.read_table(inputs / f"part-{k}.parquet").to_pylist()]
    assert seen_idx == list(range(205))
    assert seen_ids == expected


def test_fallback_id_is_file_and_row(tmp_path: Path) -> None:
    inputs = _three_files(tmp_path)
    plan = make_plan(_job(inputs, 100), STORE)
    batch = next(shard_batches(STORE, plan, plan.shards[0], ["prompt"], None))
    assert batch.column(ROW_ID)[3].as_py() == f"{inputs / 'part-0.parquet'}:3"


def test_fingerprint_follows_outputs_not_speed(tmp_path: Path) -> None:
    inputs = _three_files(tmp_path)
    base = make_plan(_job(inputs, 50), STORE).fingerprint
    faster = load_job(inline={"input": {"path": str(inputs)}, "shards": {"rows_per_shard": 50},
                              "engine": {"model": "m", "max_in_flight": 3},
                              "output": {"path": "o", "flush_rows": 5}})
    assert make_plan(faster, STORE).fingerprint == base
    (inputs / "part-1.parquet").unlink()
    write_prompts(inputs / "part-1.parquet", prompt_rows(6))
    assert make_plan(_job(inputs, 50), STORE).fingerprint != base


def test_every_page_of_a_prefix_listing_is_planned(s3) -> None:
    """Listing follows pagination (pages of 4 keys here, S3's 1,000 by default); every
    footer is read."""
    bucket = s3.bucket("many-inputs")
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(prompt_rows(3)), sink)
    client = s3.client()
    for i in range(10):
        client.put_object(Bucket=bucket, Key=f"prompts/{i:05d}.parquet", Body=sink.getvalue())
    store = Storage(page_size=4)
    pages: list[int] = []
    store._s3.client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda parsed, **_: pages.append(parsed["KeyCount"]))
    plan = make_plan(_job(f"s3://{bucket}/prompts/", 1000), store)  # type: ignore[arg-type]
    assert pages == [4, 4, 2]
    assert len(plan.files) == 10 and plan.total_rows == 30
    assert plan.files[-1].path == f"s3://{bucket}/prompts/00009.parquet"
    assert all(f.version for f in plan.files)  # ETags, for the fingerprint
