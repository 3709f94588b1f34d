"""The miniature Kimi-K2 kit: a model folder writer, synthetic tasks, a trainer, an eval.

Used by the demos, tests and benchmarks from a source checkout (run from the repo root,
e.g. `python -m miniature.tiny_model OUT_DIR`); not part of the thinkbatch wheel.
"""
