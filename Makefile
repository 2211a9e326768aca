# Every target sets the environment up first (idempotent, fast when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false
## OpenMP threads sleep instead of spinning while they wait: on cores that other jobs share, a
## spinning thread holds up every parallel region while its sibling is descheduled (a 2-thread
## evaluation ran 20x slower so, 2026-12-01). How threads wait, never how work is split: the
## trained numbers are bit-identical (results/presa_step_profile.json, train_log). OMP_WAIT_POLICY=ACTIVE to change.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: env test train base-eval data judge eval bench clean-env

env:
	@scripts/setup_env.sh

## The README's test command: set up, then the whole suite.
test: env
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

## The README's main job: PRESA LoRA on the embedded model and embedded data (defaults:
## llm_safepref/recipes/configs/presa_lora.yaml; docs/recipes.md).
## Nothing is built first: the benchmark ships inside the package (llm_safepref/data/built/;
## `python -m llm_safepref.data build --verify` rebuilds it and checks it is identical), and so does the
## base model's evaluation for these defaults at 2 threads (llm_safepref/recipes/base_eval/; read
## instead of re-evaluating when every input matches: --eval_base_cache false to re-evaluate).
## accelerate gives a CPU process 1 thread unless told otherwise: use every core (THREADS=N to change).
THREADS ?= $(shell nproc)
train: env
	$(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(THREADS) recipes/presa_lora.py $(ARGS)

## Re-produce the shipped base evaluation after a change that invalidates it (model, benchmark
## prompts, evaluation settings, judge, library versions): make train's defaults at 2 threads,
## base model only, then its cache entry is copied into llm_safepref/recipes/base_eval/ (commit it).
base-eval: env
	$(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process 2 recipes/presa_lora.py \
		--eval_base_only true --output_dir outputs/base_eval_only $(ARGS)
	$(PY) -m llm_safepref.recipes.base_eval ship outputs/base_eval_only/base_eval.json

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
