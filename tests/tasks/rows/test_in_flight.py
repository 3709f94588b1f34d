"""The engine's in-flight limit: the job's cap, or the KV cache's tokens over the tokens a
request is expected to hold; and the rows a worker keeps waiting for it
(tasks/rows/in_flight.py)."""

from __future__ import annotations

from thinkbatch.tasks.rows.in_flight import Backlog, InFlight

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _finishing(every_s: float, rows: int, lead_s: float) -> tuple[Backlog, Clock]:
    """A backlog whose engine has ended `rows` rows, one every `every_s`, with shards'
    claims and first reads taking `lead_s`."""
    clock = Clock()
    backlog = Backlog(clock)
    for _ in range(rows):
        clock.now += every_s
        backlog.row_done()
    backlog.lead(lead_s)
    return backlog, clock


def test_a_worker_fills_its_engine_before_any_row_has_finished() -> None:
    backlog, _ = _finishing(44.0, rows=1, lead_s=3.0)
    assert backlog.wanted(228) == 228
    backlog.add(227)
    assert backlog.wants_rows(228)
    backlog.add(1)
    assert not backlog.wants_rows(228)


def test_rows_of_hours_keep_a_row_or_two_waiting_not_the_engines_fill() -> None:
    """A Kimi-K2-Thinking node: 228 slots, rows of ~2.8 h, so a row ends every ~44 s; a
    claim and its first read take 3 s. Waiting rows beyond what the engine starts in
    that time are hours of its work that idle engines cannot have at the end of a job."""
    backlog, clock = _finishing(44.0, rows=64, lead_s=3.0)
    assert backlog.wanted(228) == 1  # 64 rows in 2,816 s, times 2 x 3 s of lead
    backlog.add(1)
    assert not backlog.wants_rows(228)
    backlog.add(-1)
    assert backlog.wants_rows(228)  # none waiting: claim
    backlog.lead(120.0)  # a slow claim (a throttled store): more rows kept
    assert backlog.wanted(228) == 6
    clock.now += 10 * 3600  # nothing ended for hours: the rate falls, one row still wanted
    assert backlog.wanted(228) == 1


def test_rows_of_a_second_keep_the_limit_waiting() -> None:
    backlog, _ = _finishing(0.02, rows=64, lead_s=0.01)  # 50 rows a second, 1 s of lead
    assert backlog.wanted(64) == 64
    assert backlog.wanted(1_000) == 100
