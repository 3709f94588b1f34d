# The two commands of the README. Both do all set-up on a fresh machine.
.PHONY: setup demo demo-random test

setup:
	bash scripts/setup.sh

# The trained miniature Kimi-K2 (assets/tiny-kimi-thinking, real weights) on 300
# held-out prompts.
demo: setup
	.venv/bin/python -m miniature.tiny_tasks examples/data 300
	rm -rf out/demo
	.venv/bin/thinkbatch run examples/demo.yaml

# The random-weight miniature, forced into Kimi's format by a regex: plumbing only.
# Also writes the model and rows that examples/features.yaml uses.
demo-random: setup
	.venv/bin/python -m miniature.tiny_model models/tiny-kimi
	.venv/bin/python examples/make_demo_data.py examples/data
	rm -rf out/demo-random
	.venv/bin/thinkbatch run examples/demo-random.yaml

test: setup
	.venv/bin/python -m pytest
