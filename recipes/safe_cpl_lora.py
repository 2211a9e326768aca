"""Safe-CPL: a latent-user-conditioned LoRA policy from crowd preferences, then a new task by choosing z.

    accelerate launch recipes/safe_cpl_lora.py                          # embedded model + crowd, CPU-sized
    accelerate launch recipes/safe_cpl_lora.py --config my.yaml --max_steps 300
    accelerate launch recipes/safe_cpl_lora.py --model_name_or_path ./my-model \\
        --dataset_name my_crowd.jsonl --user_column annotator --output_dir D --max_steps N   # stage 1 only
    accelerate launch recipes/safe_cpl_lora.py --downstream_task my_module:my_reward        # another task

parse -> check data, task and judge -> stage 1 (SafeCPLTrainer) -> save the artefact (adapter +
encoder + conditioning + prior, model card) -> publish (--push_to_hub) -> stage 2 (search over K
prior draws; an amortised high-level policy) and the baselines (task-only, oracle, RC) with K
candidates per test prompt -> the table (downstream.json / .md). The flow is
llm_safepref.recipes.safe_cpl; defaults: llm_safepref/recipes/configs/safe_cpl_lora.yaml; every
option of SafeCPLConfig, TRL's ModelConfig and SafeCPLRecipeArguments is a flag (docs/safe_cpl.md).
"""

from __future__ import annotations

import sys

from llm_safepref.recipes.safe_cpl import run_safe_cpl_recipe


def main(argv: list[str] | None = None) -> int:
    return run_safe_cpl_recipe(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
