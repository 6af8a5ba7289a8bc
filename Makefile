# The two commands of README.md. Each does its own set-up first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# A small end-to-end ZO fine-tune: 2 CPU ranks, ZeRO-3, offline (tiny OPT on a synthetic task).
demo: setup
	.venv/bin/deepspeed --num_gpus 2 --module subzero_ds.train

# The whole test suite (unit + 2-rank distributed tests on CPU/gloo).
test: setup
	.venv/bin/python -m pytest tests
