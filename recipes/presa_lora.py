"""Align a causal LM with PRESA (preferences + safety labels) as a LoRA adapter.

    accelerate launch recipes/presa_lora.py                       # embedded model + data, CPU-sized
    accelerate launch recipes/presa_lora.py --config my.yaml --max_steps 300
    accelerate launch recipes/presa_lora.py --model_name_or_path ./my-model --dataset_name my_pairs.jsonl
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/presa_lora.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name PKU-Alignment/PKU-SafeRLHF

parse -> evaluate the base -> train (PresaTrainer) -> save adapter + lagrange.json -> evaluate
again -> metrics + model card -> publish (--push_to_hub) -> before/after table; the flow is
llm_safepref.recipes.run_recipe. Defaults: llm_safepref/recipes/configs/presa_lora.yaml. Every
option of PresaConfig, TRL's ModelConfig and RecipeArguments is a flag (docs/recipes.md).
"""

from __future__ import annotations

import sys

from llm_safepref.recipes import Recipe, run_recipe
from llm_safepref.presa_config import PresaConfig
from llm_safepref.presa_trainer import PresaTrainer

RECIPE = Recipe(
    method="presa",
    defaults="presa_lora",
    config_class=PresaConfig,
    build_trainer=PresaTrainer,  # trains on every column: the pairs and both safety labels
    hyperparameters=(
        "pref_loss", "cpl_alpha", "cpl_bias", "cpl_reference", "beta", "safety_beta", "safety_delta",
        "safety_ref_point", "safety_safe_weight", "safety_unsafe_weight", "safety_exclude_safe_rejected",
        "nu_init", "nu_lr", "nu_max", "learning_rate", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "max_length", "seed",
    ),
    description=__doc__,
)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
