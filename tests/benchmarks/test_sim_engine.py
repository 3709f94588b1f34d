"""The fleet simulation's engine (benchmarks/sim_engine.py): rows take their simulated
decode time, no more rows than slots decode at full speed, the KV cache preempts as
vLLM v1 does, and slot use is integrated exactly. A fake clock drives it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sim_engine import Lengths, Recorder, SimEngine, SimModel  # noqa: E402

from thinkbatch.schemas.record import RowRequest  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, sim_s: float) -> None:
        self.t += max(sim_s, 0.0)


def _engine(model: SimModel, rows: dict[int, tuple[int, int]], record: Recorder | None = None
            ) -> tuple[SimEngine, FakeClock]:
    clock = FakeClock()
    lengths = {i: (p, o, False) for i, (p, o) in rows.items()}
    return SimEngine(model, lengths.__getitem__, clock, name="node-a", record=record,
                     step_s=1e9), clock


def _run(engine: SimEngine, clock: FakeClock, rows: list[int]) -> dict[int, float]:
    """Submit `rows`, poll until all are back; each row's finish time."""
    for i in rows:
        engine.submit(str(i), RowRequest(row_index=i, row_id=str(i), passthrough=()), None)
    finished = {}
    while engine.in_flight:
        for gen in engine.poll():
            finished[int(gen.key)] = clock.t
    return finished


FAST_PREFILL = dict(prefill_tokens_per_s=1e12, watermark=0.0)


def test_a_row_alone_takes_its_tokens_at_the_decode_rate(tmp_path: Path) -> None:
    record = Recorder(tmp_path / "events.jsonl")
    model = SimModel(kv_tokens=100_000, tokens_per_row=10_000, s_per_token=0.4,
                     prefill_tokens_per_s=100.0)
    engine, clock = _engine(model, {7: (100, 1000)}, record)
    engine.submit("7", RowRequest(row_index=7, row_id="q7", passthrough=()), None)
    gens = []
    while engine.in_flight:
        gens += engine.poll()
    engine.close()
    assert clock.t == pytest.approx(1.0 + 1000 * 0.4)  # its prefill, then its decode
    [gen] = gens
    assert (gen.key, gen.text, len(gen.token_ids), len(gen.prompt_token_ids)) == \
        ("7", "node-a", 1000, 100)
    assert gen.latency_s == pytest.approx(401.0)
    events = [json.loads(line)["e"] for line in (tmp_path / "events.jsonl").read_text().split()]
    assert [e for e in events if e != "use"] == ["sub", "start", "fin", "closed"]


@pytest.mark.parametrize("rows, finish_s, busy", [(5, 40.0, 0.5), (10, 40.0, 1.0),
                                                  (20, 80.0, 1.0)])
def test_slots_bound_the_throughput(rows: int, finish_s: float, busy: float) -> None:
    """10 slots: 5 rows leave half idle, 20 rows each decode at half speed."""
    model = SimModel(kv_tokens=100_000, tokens_per_row=10_000, s_per_token=0.4, **FAST_PREFILL)
    assert model.slots == 10
    engine, clock = _engine(model, {i: (10, 100) for i in range(rows)})
    finished = _run(engine, clock, list(range(rows)))
    assert sorted(finished.values()) == pytest.approx([finish_s] * rows)
    assert engine.use.busy_slot_s / (model.slots * finish_s) == pytest.approx(busy)
    assert engine.use.output_tokens == 100 * rows


def test_with_a_step_that_shortens_an_emptying_engine_decodes_each_row_faster() -> None:
    """10 slots, 0.04 s per token alone, 0.4 full: two rows decode at 0.08 s a token each
    (a ninth of the way from alone to full); once the shorter finishes, the other goes on
    alone at 0.04. Ten rows run at 0.4, as without the variant."""
    model = SimModel(kv_tokens=100_000, tokens_per_row=10_000, s_per_token=0.4,
                     s_per_token_alone=0.04, **FAST_PREFILL)
    engine, clock = _engine(model, {0: (10, 100), 1: (10, 200)})
    assert _run(engine, clock, [0, 1]) == pytest.approx({0: 8.0, 1: 8.0 + 100 * 0.04})
    engine, clock = _engine(model, {i: (10, 100) for i in range(10)})
    assert sorted(_run(engine, clock, list(range(10))).values()) == pytest.approx([40.0] * 10)


def test_a_full_kv_cache_preempts_the_newest_row_which_keeps_its_tokens() -> None:
    """1,000 KV tokens, three rows of 100 + 400: they overflow at 233 tokens each; the
    newest gives its cache back and re-enters when the first two finish."""
    model = SimModel(kv_tokens=1000, tokens_per_row=100, s_per_token=1.0, **FAST_PREFILL)
    engine, clock = _engine(model, {i: (100, 400) for i in range(3)})
    finished = _run(engine, clock, [0, 1, 2])
    assert engine.use.preemptions == 1
    assert engine.use.recomputed_tokens == pytest.approx(100 + 700 / 3, abs=1)
    assert finished[0] == finished[1] == pytest.approx(400.0)
    assert finished[2] == pytest.approx(400.0 + 400 - 700 / 3)  # the rest of its tokens
    assert engine.kv_used == pytest.approx(0.0, abs=1e-3)


def test_lengths_are_heavy_tailed_cut_at_max_tokens_and_the_same_everywhere() -> None:
    model = SimModel()
    a, b = Lengths(model, 100_000), Lengths(model, 100_000)
    assert (a.output == b.output).all() and a(123) == b(123)
    typical = ((a.output >= 10_000) & (a.output <= 40_000)).mean()
    assert 0.7 < typical < 0.8
    assert a.output.max() == model.max_tokens and a.cut.sum() == (a.output == model.max_tokens).sum()
    assert 200 <= model.slots <= 240  # 5,721,088 KV tokens over 25k-token rows
