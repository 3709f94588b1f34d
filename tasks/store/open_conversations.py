"""A rollout's open conversations, saved between turns so that a kill resumes each one at
its last finished tool call instead of running its tools again from turn 1.

One small file per conversation, `_open/NNNNNN/<row_index>-<sample>.json`, replaced whole
at each save (its content is the row path's, rows/conversation.py: the store keeps bytes).
The committer writes them on its writer thread, fenced by the shard's claim like parts.
A row committed in a part wins over its open file: `load` skips the keys committed, the
committer deletes a conversation's file once its row's part is written, and the shard's
folder goes when the shard is done. A stale file (a fenced-out writer's, or one whose
delete a kill cut short) is therefore never resumed once its row is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from thinkbatch.tasks.store.layout import OutputLayout
from thinkbatch.tasks.store.storage import join

Key = tuple[int, int]  # (row_index, sample)
T = TypeVar("T")
R = TypeVar("R")
IO_THREADS = 16  # small objects: on S3 each is a request, latency-bound one after another


def _key(name: str) -> Key | None:
    """The key of a file named `<row_index>-<sample>.json`; None for any other name."""
    row, _, sample = name.removesuffix(".json").partition("-")
    return (int(row), int(sample)) if row.isdigit() and sample.isdigit() else None


def write(layout: OutputLayout, shard_id: int, states: dict[Key, bytes]) -> None:
    """Each conversation's latest state, each file atomic (the fence is the caller's)."""
    def one(item: tuple[Key, bytes]) -> None:
        (row, sample), data = item
        layout.store.write_atomic(layout.open_conversation(shard_id, row, sample), data)

    _each(one, list(states.items()))


def load(layout: OutputLayout, shard_id: int, committed: set[Key]) -> dict[Key, bytes]:
    """The shard's open conversations whose rows are not committed: one listing, then a
    read of each."""
    folder = layout.open_conversations(shard_id)
    keys = [k for n in layout.store.list_files(folder, ".json")
            if (k := _key(n)) is not None and k not in committed]

    def one(key: Key) -> bytes | None:
        try:
            return layout.store.read_bytes(layout.open_conversation(shard_id, *key))
        except FileNotFoundError:  # its row was committed meanwhile
            return None

    states = _each(one, keys)
    return {k: s for k, s in zip(keys, states) if s is not None}


def forget(layout: OutputLayout, shard_id: int, keys: Iterable[Key]) -> None:
    """Delete the open files of conversations whose rows are now committed."""
    _each(lambda key: layout.store.delete(layout.open_conversation(shard_id, *key)),
          list(keys))


def sweep(layout: OutputLayout, shard_id: int) -> int:
    """Delete every open file of a done shard (what a kill or a fenced-out writer left);
    returns how many."""
    folder = layout.open_conversations(shard_id)
    names = layout.store.list_files(folder, ".json")
    _each(lambda name: layout.store.delete(join(folder, name)), names)
    layout.store.remove_temporaries(folder)  # a local write a kill cut short
    return len(names)


def _each(fn: Callable[[T], R], items: list[T]) -> list[R]:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))
