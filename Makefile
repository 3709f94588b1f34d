# The two commands of the README. Both do all set-up on a fresh machine.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/thinkbatch tiny-model models/tiny-kimi
	.venv/bin/python examples/make_demo_data.py examples/data
	rm -rf out/demo
	.venv/bin/thinkbatch run examples/demo.yaml

test: setup
	.venv/bin/python -m pytest
