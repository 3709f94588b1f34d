# The two commands of the README. Both do all set-up on a fresh machine.
.PHONY: setup demo demo-rollout demo-random test bench-peers

setup:
	bash scripts/setup.sh

# The trained miniature Kimi-K2 (assets/tiny-kimi-thinking, real weights) on 300
# held-out prompts.
demo: setup
	.venv/bin/python -m miniature.tiny_tasks examples/data 300
	rm -rf out/demo
	.venv/bin/thinkbatch run examples/demo.yaml

# The same prompts as agentic rollouts: the trained miniature calls the Python tools of
# examples/tools.py, reads their results and answers; then the conversations' figures.
demo-rollout: setup
	.venv/bin/python -m miniature.tiny_tasks examples/data 300
	rm -rf out/demo-rollout
	.venv/bin/thinkbatch run examples/demo-rollout.yaml
	.venv/bin/python -m miniature.eval_tiny_model --score out/demo-rollout

# The random-weight miniature, forced into Kimi's format by a regex: plumbing only.
# Also writes the model and rows that examples/features.yaml uses.
demo-random: setup
	.venv/bin/python -m miniature.tiny_model models/tiny-kimi
	.venv/bin/python examples/make_demo_data.py examples/data
	rm -rf out/demo-random
	.venv/bin/thinkbatch run examples/demo-random.yaml

test: setup
	.venv/bin/python -m pytest

# thinkbatch side by side with Ray Data LLM (benchmarks/peers_ray.py, ~10 min on 2
# cores). Ray is installed on demand beside the product, never into it: --no-deps keeps
# Ray's `llm` extra from pinning another vLLM, and only Ray's driver process gets
# .bench-peers/ (git-ignored) on its PYTHONPATH.
PEERS := .bench-peers
$(PEERS)/.installed:
	.venv/bin/python -m pip install --no-deps --target $(PEERS) ray==2.60.0 msgpack pandas smart_open
	touch $@

bench-peers: setup $(PEERS)/.installed
	THINKBATCH_BENCH_PEERS=$(PEERS) .venv/bin/python benchmarks/run.py --only peers_ray
