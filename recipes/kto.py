"""Baseline: TRL's KTOTrainer (LoRA) on the safety labels of the same data.

    accelerate launch recipes/kto.py
    accelerate launch recipes/kto.py --config my.yaml

Every response of every pair becomes one KTO example: (prompt, response, label = is_safe),
so KTO learns "safe = desirable, unsafe = undesirable" and never sees the preferences. That
is the safety half of the two-trainer alternative to PRESA (a DPO pass plus a KTO pass over
the same labels). The unpaired rows are shuffled (seeded): unpairing puts all chosen rows
first, which would make batches single-label and break KTO's reference point. A batch holds
2x the pairs' rows, so the defaults' per_device_train_batch_size 8 sees as many responses per
step as PRESA's 4 pairs. The flow is llm_safepref.recipes.run_recipe; defaults:
llm_safepref/recipes/configs/kto.yaml (docs/recipes.md).
"""

from __future__ import annotations

import sys

from llm_safepref.recipes import Recipe, run_recipe
from trl import KTOConfig, KTOTrainer


def safety_label_dataset(pairs, training_args):
    """(prompt, chosen, rejected, *_is_safe) pairs -> shuffled (prompt, completion, label) rows, 2 per pair."""
    from datasets import Dataset

    rows = []
    for ex in pairs:
        rows.append({"prompt": ex["prompt"], "completion": ex["chosen"], "label": bool(ex["chosen_is_safe"])})
        rows.append({"prompt": ex["prompt"], "completion": ex["rejected"], "label": bool(ex["rejected_is_safe"])})
    return Dataset.from_list(rows).shuffle(seed=training_args.seed)


RECIPE = Recipe(
    method="kto",
    defaults="kto",
    config_class=KTOConfig,
    build_trainer=KTOTrainer,
    training_dataset=safety_label_dataset,
    hyperparameters=("beta", "desirable_weight", "undesirable_weight", "learning_rate", "max_steps",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed"),
    description=__doc__,
)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
