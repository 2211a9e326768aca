"""Baseline: TRL's DPOTrainer (LoRA) on the same data and evaluation as recipes/presa_lora.py.

    accelerate launch recipes/dpo.py
    accelerate launch recipes/dpo.py --config my.yaml

DPO sees only the preferences: the safety labels are dropped from its dataset. Same model,
data, LoRA, batch, steps and evaluation as the PRESA recipe, so the before/after rates are
directly comparable. The flow is llm_safepref.recipes.run_recipe; defaults:
llm_safepref/recipes/configs/dpo.yaml (docs/recipes.md).
"""

from __future__ import annotations

import sys

from llm_safepref.recipes import Recipe, run_recipe
from trl import DPOConfig, DPOTrainer


def preference_columns(pairs, training_args):
    """DPO's columns: the pairs without their safety labels."""
    return pairs.select_columns(["prompt", "chosen", "rejected"])


RECIPE = Recipe(
    method="dpo",
    defaults="dpo",
    config_class=DPOConfig,
    build_trainer=DPOTrainer,
    training_dataset=preference_columns,
    hyperparameters=("beta", "learning_rate", "max_steps", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_length", "seed"),
    description=__doc__,
)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
