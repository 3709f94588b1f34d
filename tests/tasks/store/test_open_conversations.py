"""A rollout's open conversations in the output folder: saved through the committer,
fenced by the shard's claim like parts, and never resumed once their row is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinkbatch.schemas.manifest import ShardStats
from thinkbatch.schemas.output import output_schema
from thinkbatch.tasks.store import checkpoint, open_conversations
from thinkbatch.tasks.store.commit import Committer, FencedOut
from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import Storage


def _row(i: int) -> dict:
    return {"id": f"r{i}", "row_index": i, "sample_index": 0, "status": "ok",
            "prompt_tokens": 3, "completion_tokens": 5}


def _committer(layout: OutputLayout, may_commit=lambda shard_id: True, **kw) -> Committer:
    return Committer(layout, output_schema(), flush_rows=100, flush_seconds=60,
                     compression="zstd", on_shard_done=lambda s, stats: None,
                     may_commit=may_commit, save_seconds=0, **kw)


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path: Path) -> OutputLayout:
    if request.param == "local":
        return OutputLayout(str(tmp_path / "out"), Storage())
    s3 = request.getfixturevalue("s3")
    return OutputLayout(f"s3://{s3.bucket('open')}/{tmp_path.name}", Storage())


def test_saved_states_load_back_until_their_rows_are_committed(layout: OutputLayout) -> None:
    c = _committer(layout)
    for i in range(3):
        c.save(0, (i, 0), b'{"turn": 1}')
    c.save(0, (1, 0), b'{"turn": 2}')  # the latest state of a conversation wins
    c.maybe_flush()
    c.close()
    assert open_conversations.load(layout, 0, set()) == {
        (0, 0): b'{"turn": 1}', (1, 0): b'{"turn": 2}', (2, 0): b'{"turn": 1}'}

    # A kill between a row's part and its file's delete: the part wins.
    c = _committer(layout)
    c.add(0, _row(1))
    c.flush()
    c.close()
    assert open_conversations.load(layout, 0, checkpoint.committed_keys(layout, 0)) == {
        (0, 0): b'{"turn": 1}', (2, 0): b'{"turn": 1}'}
    # That run did not save row 1's state, so its file stays, and is skipped.
    assert open_conversations.load(layout, 0, {(0, 0)}).keys() == {(1, 0), (2, 0)}


def test_a_committed_rows_file_is_deleted_and_a_done_shard_keeps_none(
        layout: OutputLayout) -> None:
    c = _committer(layout)
    c.save(0, (0, 0), b"a")
    c.save(0, (1, 0), b"b")
    c.maybe_flush()
    c.save(0, (2, 0), b"c")
    c.add(0, _row(0))
    c.add(0, _row(2))  # ended before its state was written: written, then gone with its part
    c.flush()
    c.close()
    assert open_conversations.load(layout, 0, set()) == {(1, 0): b"b"}

    c = _committer(layout)
    c.add(0, _row(2))
    c.finish_shard(0)  # its marker: what is left of the shard's open files goes
    c.close()
    assert checkpoint.done_stats(layout, 0) is not None
    assert open_conversations.load(layout, 0, set()) == {}


def test_a_conversation_that_ended_keeps_its_last_state_until_its_row_is_committed(
        layout: OutputLayout) -> None:
    """Answered, its row waits in the buffer for its part: a kill then must resume it from
    its last tool call, not from an earlier save that would run that call again."""
    c = _committer(layout)
    c.save(0, (0, 0), b"after turn 1")
    c.maybe_flush()
    c.save(0, (0, 0), b"after turn 2")
    c.add(0, _row(0))  # it answered at turn 3
    c.maybe_flush()  # its part is not due yet (flush_rows 100)
    c.close()  # killed: the row was never committed
    assert open_conversations.load(layout, 0, set()) == {(0, 0): b"after turn 2"}


def test_a_fenced_out_writer_saves_no_open_conversation(layout: OutputLayout) -> None:
    lost: dict[int, FencedOut] = {}
    c = _committer(layout, may_commit=lambda shard_id: shard_id != 0,
                   on_lost=lambda shard_id, e: lost.__setitem__(shard_id, e))
    c.save(0, (0, 0), b"stale")
    c.save(1, (40, 0), b"ours")
    c.maybe_flush()
    c.save(0, (1, 0), b"stale too")  # the shard was given up: nothing more of it
    c.flush()
    c.close()
    assert list(lost) == [0] and "not saving its open conversations" in str(lost[0])
    assert open_conversations.load(layout, 0, set()) == {}
    assert open_conversations.load(layout, 1, set()) == {(40, 0): b"ours"}


def test_single_turn_jobs_save_nothing(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"), Storage())
    done: list[ShardStats] = []
    c = Committer(layout, output_schema(), flush_rows=100, flush_seconds=60,
                  compression="zstd", on_shard_done=lambda s, stats: done.append(stats),
                  may_commit=lambda shard_id: True)
    c.save(0, (0, 0), b"a")
    c.add(0, _row(0))
    c.finish_shard(0)
    c.close()
    assert len(done) == 1 and not (tmp_path / "out" / "_open").exists()
