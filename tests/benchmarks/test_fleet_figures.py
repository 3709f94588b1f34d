"""The fleet simulation's figures from the rows' start and finish (benchmarks/fleet_figures.py
`_rows`, `chart`): each row's first submit and final finish, per node the output rate and
slot use per simulated hour, a row dropped with a lost claim closed at its abort. A run's
records are built by hand, so every figure is known."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fleet_figures import Node, Records, chart, figures, summary_rows  # noqa: E402
from sim_engine import SimModel  # noqa: E402

H = 3600.0


def _records() -> Records:
    """Node a (2 slots, 0-4 h) runs rows 0 and 1 from 0 to 2 h, rows 2 and 3 from 2 h
    to 4 h and 3 h; node b (2 slots, 0-1 h) took row 3 at 0 and dropped it at 0.5 h (a
    lost claim), then was killed at 1 h. a's engine finished row 0 at 1.5 h, the pipeline
    took it at 2 h."""
    model = SimModel(kv_tokens=2, tokens_per_row=1)
    a = Node("a", 0, 0, pid=100, started=0.0, ended=4 * H, fate="done", rc=0, loaded=0.0,
             slots=2, submitted={"0:0:0": 0.0}, finished={"0:0:0": 1.5 * H})
    b = Node("b", 1, 1, pid=200, started=0.0, ended=1 * H, fate="killed", rc=-9,
             loaded=0.0, slots=2, aborted={(3, 0): 0.5 * H})
    spans = [(100, 0, 0, 2), (100, 1, 0, 2), (100, 2, 2, 4), (100, 3, 2, 3)]
    requests = [(s * H, pid, row, 0, 0) for pid, row, s, _ in spans]
    requests += [(f * H, pid, row, 0, 1) for pid, row, _, f in spans]
    requests.append((0.0, 200, 3, 0, 0))
    requests.sort()
    output = {"rows": 4, "distinct": 4, "lost": 0, "duplicated": 0, "parts": 2,
              "orphan_parts": 0, "orphan_rows": 0, "shards_unfinished": 0, "status": {},
              "output_tokens": 4 * 3600, "generated_by": {0: "a", 1: "a", 2: "a", 3: "a"}}
    return Records(
        settings=SimpleNamespace(scale=1 / H, claim_ttl_sim_s=9000.0), model=model,
        nodes=[a, b], chaos=[{"kind": "kill", "t": 1 * H, "instance": "b"}],
        commits=np.array([[2 * H, 2], [4 * H, 2]], dtype=float),
        requests=np.array(requests, dtype=float), output_tokens=np.full(4, 3600),
        s3=[], prefect={}, output=output, shards=2, ended=4 * H)


def test_rows_give_each_row_its_span_and_each_node_its_use_and_rate():
    f = figures(_records())
    rows = f["from_rows"]
    assert rows["finished_series"]["rows"] == [0, 2, 3, 4]  # by the end of each hour
    assert rows["last_finish_s"] == 4 * H and rows["t90_s"] == 4 * H
    longest = rows["longest_row"]  # row 3: first submitted on b at 0, finished on a at 3 h
    assert (longest["row"], longest["span_s"]) == (3, 3 * H)
    a, b = rows["nodes"]["a"], rows["nodes"]["b"]
    assert a["slot_use"] == [1.0, 1.0, 1.0, 0.5]
    assert a["output_tok_s"] == pytest.approx([1.0, 1.0, 1.5, 0.5])  # 3,600 tokens a row
    assert b["slot_use"] == [0.25, None, None, None]  # one row of two slots, half an hour
    assert b["output_tok_s"][0] == 0.0 and (b["rows_finished"], b["rows_dropped"]) == (0, 1)
    assert rows["fleet_slot_use"] == [pytest.approx(0.625), 1.0, 1.0, 0.5]
    # until 95% committed (4 h): a held 7 row-hours over 4 h, b 0.5 over 1 h
    assert rows["in_engine_per_node_until_95pct"] == pytest.approx(7.5 / 5)
    assert rows["poll_lag_s"]["median"] == 0.5 * H and rows["longest_attempt_s"] == 1.5 * H


def test_the_chart_and_summary_draw_from_the_rows(tmp_path: Path):
    records = _records()
    records.ended = records.nodes[0].ended = 6.5 * H  # a node ends hours after the last commit
    f = {**figures(records), "commit": "0" * 40, "run_wall_s": 4.0, "wall_s": 5.0,
         "settings": {"sim_hour_s": 1.0, "step_real_s": 0.05, "scale_wall_s_per_sim_s": 1 / H}}
    assert len(f["from_rows"]["fleet_slot_use"]) > len(f["slot_use_series"]["fleet"])
    chart(f, tmp_path / "fleet.png")
    assert (tmp_path / "fleet.png").read_bytes()[:4] == b"\x89PNG"
    figures_named = [r["figure"] for r in summary_rows({"x": f})]
    assert any("the longest row" in n for n in figures_named)
