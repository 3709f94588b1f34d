"""One simulated GPU node of the fleet simulation: the real worker flow, a simulated engine.

    python sim_worker.py CONFIG.json WORKER_INDEX INSTANCE

Runs `thinkbatch.flows.worker.shard_worker`, the flow a scale-out deployment runs on each
node, against the fleet's Prefect server and S3 endpoint (from the environment), with
`get_engine` replaced in that module by one that loads a `SimEngine` (sim_engine.py) for
the model's load time, and its first claim made to wait for the run's start (`Gate`,
through a subclass of its `ShardClaims`). Nothing else of the product is touched:
claims, leases, the pipeline, commits and the loop's own constants run as they are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class Gate:
    """The run's start: this node says it is ready (a file), then waits for the go file,
    which holds the Unix time the simulated clock starts at (a replacement started later
    finds it there). Passed at the worker's first claim, so its flow run is created, the
    plan read and its clients made before the clock starts: that costs seconds of wall
    time here (more on a loaded machine), which the clock's scale would turn into hours."""

    def __init__(self, config: dict[str, Any], instance: str):
        self.config, self.instance = config, instance
        self.clock: Any = None

    def open(self) -> Any:
        if self.clock is None:
            from sim_engine import SimClock

            Path(self.config["ready"], self.instance).touch()
            go = Path(self.config["go"])
            while not go.exists():
                time.sleep(0.05)
            self.clock = SimClock(float(go.read_text()), self.config["scale"])
        return self.clock


def main(config_path: str, index: int, instance: str) -> int:
    config = json.loads(Path(config_path).read_text())
    from sim_engine import Lengths, Loading, Recorder, SimEngine, SimModel

    import thinkbatch.flows.worker as worker
    import thinkbatch.tasks.runner as runner
    from thinkbatch.tasks.rows import engine as engine_module

    model = SimModel(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in config["model"].items()})
    lengths = Lengths(model, config["rows"])
    record = Recorder(Path(config["events"]) / f"{instance}.jsonl")
    gate = Gate(config, instance)

    class GatedClaims(runner.ShardClaims):
        def claim_next(self) -> int | None:
            if gate.clock is None:
                record(e="up", t=round(gate.open().now(), 1), index=index)
                record.flush()
            return super().claim_next()

    def get_engine(spec: Any, parsers: Any, seeded: bool = False) -> SimEngine:
        """One engine per process, as the real one: loaded at the first claim."""
        if "sim" not in engine_module._ENGINES:  # close_engines() closes it at the end
            clock = gate.open()
            Loading(model, clock, record, seed=config["seeds"][instance])()
            engine_module._ENGINES["sim"] = SimEngine(
                model, lengths, clock, name=instance, record=record,
                step_s=config["step_real_s"] / config["scale"])
        return engine_module._ENGINES["sim"]

    runner.ShardClaims = GatedClaims
    runner.get_engine = get_engine
    try:
        worker.shard_worker(job=config["job"], worker_index=index)
    finally:
        if gate.clock is not None:
            record(e="exit", t=round(gate.clock.now(), 1))
        record.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
