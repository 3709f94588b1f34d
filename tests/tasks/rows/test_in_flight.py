"""The engine's in-flight limit: the job's cap, or the KV cache's tokens over the tokens a
request is expected to hold (tasks/rows/in_flight.py)."""

from __future__ import annotations

from thinkbatch.tasks.rows.in_flight import InFlight

DCP8_KV, TP8_KV = 5_721_088, 715_072  # the recipe's logs for Kimi-K2-Thinking on 8xH200


def test_the_kv_cache_bounds_the_cap_at_max_tokens_a_request() -> None:
    limit = InFlight(cap=1024, kv_tokens=TP8_KV, max_tokens=131_072)
    assert limit.limit == 5  # no request preempted, even at max_tokens each
    fig = limit.figures()
    assert (fig.cap, fig.kv_cache_tokens, fig.expected_tokens_per_row, fig.limit) == (
        1024, TP8_KV, 131_072, 5)


def test_a_job_that_says_its_row_size_gets_more_and_the_cap_still_holds() -> None:
    assert InFlight(cap=1024, kv_tokens=DCP8_KV, max_tokens=131_072,
                    expected_tokens=32_768).limit == DCP8_KV // 32_768 == 174
    assert InFlight(cap=16, kv_tokens=DCP8_KV, max_tokens=64).limit == 16
    assert InFlight(cap=16, kv_tokens=None, max_tokens=1 << 20).limit == 16  # replay: no cache
    assert InFlight(cap=16, kv_tokens=100, max_tokens=1000).limit == 1  # never 0
