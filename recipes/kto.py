"""Baseline: TRL's KTOTrainer (LoRA) on the safety labels of the same data.

    accelerate launch recipes/kto.py
    accelerate launch recipes/kto.py --config recipes/configs/kto.yaml

Every response of every pair becomes one KTO example: (prompt, response, label = is_safe),
so KTO learns "safe = desirable, unsafe = undesirable" and never sees the preferences. That
is the safety half of the two-trainer alternative to PRESA (a DPO pass plus a KTO pass over
the same labels). The unpaired rows are shuffled (seeded): unpairing puts all chosen rows
first, which would make batches single-label and break KTO's reference point.
``DEFAULTS`` is mirrored in recipes/configs/kto.yaml; the batch holds 2x the pairs' rows, so
``per_device_train_batch_size: 8`` sees as many responses per step as PRESA's 4 pairs.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _recipe_common import (  # noqa: E402
    save_trained,
    RecipeArguments,
    finish_run,
    load_train_dataset,
    model_init_kwargs,
    parse_args,
    run_evaluation,
)

DEFAULTS = {
    "model_name_or_path": "embedded",
    "dataset_name": "embedded",
    "conversational": True,
    "drop_invalid": True,
    "max_prompt_length": 128,
    "output_dir": "outputs/kto_lora",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "learning_rate": 2.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "max_steps": 60,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 160,
    "beta": 0.1,
    "bf16": False,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 20,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
    "dataloader_pin_memory": False,
    "eval_limit_per_category": 100,
    "eval_max_new_tokens": 64,
    "eval_batch_size": 16,
}

HYPERPARAMETER_KEYS = ("beta", "desirable_weight", "undesirable_weight", "learning_rate", "max_steps",
                       "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed")


def safety_label_dataset(pairs, seed: int):
    """(prompt, chosen, rejected, *_is_safe) pairs -> shuffled (prompt, completion, label) rows."""
    from datasets import Dataset

    rows = []
    for ex in pairs:
        rows.append({"prompt": ex["prompt"], "completion": ex["chosen"], "label": bool(ex["chosen_is_safe"])})
        rows.append({"prompt": ex["prompt"], "completion": ex["rejected"], "label": bool(ex["rejected_is_safe"])})
    return Dataset.from_list(rows).shuffle(seed=seed)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer, ModelConfig, get_peft_config, get_quantization_config

    from llm_safepref.models import resolve_model_name

    script_args, training_args, model_args = parse_args((RecipeArguments, KTOConfig, ModelConfig), DEFAULTS, argv)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    model_path = resolve_model_name(model_args.model_name_or_path or "embedded")
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    pairs = load_train_dataset(script_args, tokenizer=tokenizer, max_length=training_args.max_length)
    train_dataset = safety_label_dataset(pairs, seed=training_args.seed)

    before = run_evaluation(script_args, model_path, seed=training_args.seed)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    trainer = KTOTrainer(
        model=model_path, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_trained(trainer, training_args.output_dir, model_args.model_name_or_path or "embedded")

    adapter = training_args.output_dir if model_args.use_peft else None
    after = run_evaluation(script_args, model_path if adapter else training_args.output_dir, adapter=adapter,
                           seed=training_args.seed)
    hyperparameters = {k: getattr(training_args, k) for k in HYPERPARAMETER_KEYS}
    hyperparameters.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha)
    code = finish_run(
        method="kto", trainer=trainer, script_args=script_args, training_args=training_args, model_args=model_args,
        base_model=model_args.model_name_or_path or "embedded", before=before, after=after,
        hyperparameters=hyperparameters, nu_trajectory=None, push_to_hub=push_to_hub,
    )
    if hasattr(trainer, "end"):
        trainer.end()
    return code


if __name__ == "__main__":
    sys.exit(main())
