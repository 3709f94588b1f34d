"""Benchmark: the rollouts comparison (rollouts.py) again, with a tool latency heavy-tailed
enough that the turn-synchronous loop's engine idles at least a quarter of its time.

The same rows, seeds, regex and both loops; only the tool's log-normal changes: median
0.25 s and sigma 1.5 (one call in a hundred takes 8 s, the cap), so each of the loop's
turns waits for a slowest call of several seconds while thinkbatch's other conversations
go on generating.
"""

from __future__ import annotations

from typing import Any

import rollouts
from context import Context
from summary import Goal, row

MEDIAN_S, SIGMA, CAP_S = 0.25, 1.5, 8.0
GOAL_IDLE = 0.25


def run(ctx: Context) -> dict[str, Any]:
    result = rollouts.measure(ctx, "rollouts_tail", MEDIAN_S, SIGMA, CAP_S)
    idle = result["figures"]["turn_synchronous"]["engine_idle_share"]
    result["summary"].insert(0, row("(b)'s engine idle share (the workload's premise)",
                                    f"{idle:.1%}", Goal(f">= {GOAL_IDLE:.0%}", idle >= GOAL_IDLE)))
    return result
