# The two commands of README.md. Each does its own set-up first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

DATA ?= ../shared/data

setup:
	bash scripts/setup.sh

# A real ZO fine-tune, offline: SmolLM2-135M (from its PyPI package) on SST-2, 2 CPU ranks, ZeRO-3.
demo: setup
	.venv/bin/deepspeed --num_gpus 2 --module subzero_ds.train \
	  --deepspeed_config ds_configs/demo_smollm2_sst2.json \
	  --model_name_or_path smollm2-135m --task sst2 --data_dir $(DATA)/sst2 \
	  --train_as_classification --num_train 1000 --num_eval 200 --max_length 64 \
	  --max_steps 120 --log_steps 10 --eval_steps 60 --output_dir outputs/demo

# The whole test suite (unit + 2-rank distributed tests on CPU/gloo).
test: setup
	.venv/bin/python -m pytest tests
