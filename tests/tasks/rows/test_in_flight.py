"""The engine's in-flight limit: the job's cap, or the KV cache's tokens over the tokens a
request is expected to hold (tasks/in_flight.py)."""

from __future__ import annotations

from thinkbatch.tasks.rows.in_flight import MEASURED_AFTER, InFlight

DCP8_KV, TP8_KV = 5_721_088, 715_072  # the recipe's logs for Kimi-K2-Thinking on 8xH200


def test_the_kv_cache_bounds_the_cap_starting_from_max_tokens_then_measured() -> None:
    limit = InFlight(cap=1024, kv_tokens=TP8_KV, max_tokens=131_072)
    assert limit.limit == 5  # no request preempted, even at max_tokens each
    for _ in range(MEASURED_AFTER - 1):
        limit.finished(20_000)
    assert limit.limit == 5  # too few finished to trust their mean
    limit.finished(20_000)
    assert (limit.expected_tokens, limit.limit) == (20_000, 35)
    fig = limit.figures()
    assert (fig.cap, fig.kv_cache_tokens, fig.expected_tokens_per_row, fig.limit) == (
        1024, TP8_KV, 20_000, 35)


def test_a_job_that_says_its_row_size_starts_there_and_the_cap_still_holds() -> None:
    limit = InFlight(cap=1024, kv_tokens=DCP8_KV, max_tokens=131_072, expected_tokens=32_768)
    assert limit.limit == DCP8_KV // 32_768 == 174
    for _ in range(MEASURED_AFTER):
        limit.finished(10_000)
    assert limit.limit == 572
    assert InFlight(cap=16, kv_tokens=DCP8_KV, max_tokens=64).limit == 16
    assert InFlight(cap=16, kv_tokens=None, max_tokens=1 << 20).limit == 16  # replay: no cache
    assert InFlight(cap=16, kv_tokens=100, max_tokens=1000).limit == 1  # never 0
