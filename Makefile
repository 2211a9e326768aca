# Every target sets the environment up first (idempotent, fast when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env test train data judge eval bench clean-env

env:
	@scripts/setup_env.sh

## The README's test command: set up, then the whole suite.
test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

## The README's main job: PRESA LoRA on the embedded model and embedded data (defaults:
## llm_safepref/recipes/configs/presa_lora.yaml; docs/recipes.md).
## The benchmark is built once and cached (16–24 min on 2 CPU cores; 23.4 min in a fresh clone
## on 2026-12-01); later runs skip it.
## accelerate gives a CPU process 1 thread unless told otherwise: use every core (THREADS=N to change).
THREADS ?= $(shell nproc)
train: env
	$(PY) -m llm_safepref.data build
	$(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(THREADS) recipes/presa_lora.py $(ARGS)

data: env
	$(PY) -m llm_safepref.data build $(ARGS)

judge: env
	$(PY) -m llm_safepref.judge train $(ARGS)

eval: env
	$(PY) -m llm_safepref.eval $(ARGS)

## PRESA vs DPO vs the two-trainer alternative: step time and memory (benchmarks/presa_vs_dpo.py).
bench: env
	$(PY) benchmarks/presa_vs_dpo.py $(ARGS)

clean-env:
	rm -rf $(VENV)
