# The two commands of the README. Both do all set-up on a fresh machine.
.PHONY: setup demo demo-trained test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/thinkbatch tiny-model models/tiny-kimi
	.venv/bin/python examples/make_demo_data.py examples/data
	rm -rf out/demo
	.venv/bin/thinkbatch run examples/demo.yaml

# The trained miniature (assets/tiny-kimi-thinking, real weights) on held-out prompts.
demo-trained: setup
	.venv/bin/python -m thinkbatch.tasks.tiny_tasks examples/data
	rm -rf out/demo-trained
	.venv/bin/thinkbatch run examples/demo-trained.yaml

test: setup
	.venv/bin/python -m pytest
