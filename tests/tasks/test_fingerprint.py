from __future__ import annotations

from thinkbatch.schemas.job_file import load_job
from thinkbatch.tasks.fingerprint import describe_changes, fingerprint_parts
from thinkbatch.tasks.storage import FileStat

FILES = [FileStat("a.parquet", 10, "1")]


def _parts(**sampling):
    job = load_job(inline={"input": {"path": "a"}, "engine": {"model": "m"},
                           "sampling": sampling, "output": {"path": "o"}})
    return fingerprint_parts(job, FILES)


def test_changes_name_the_field_and_values() -> None:
    lines = describe_changes(_parts(temperature=0.6), _parts(temperature=1.0))
    assert lines == ["sampling.temperature: 0.6 -> 1.0"]


def test_input_file_change_is_named() -> None:
    old = _parts()
    new = fingerprint_parts(load_job(inline={"input": {"path": "a"}, "engine": {"model": "m"},
                                             "output": {"path": "o"}}),
                            [FileStat("a.parquet", 11, "2")])
    assert describe_changes(old, new) == ["input files changed (size, mtime or ETag)"]
