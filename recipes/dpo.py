"""Baseline: TRL's DPOTrainer (LoRA) on the same data and evaluation as recipes/presa_lora.py.

    accelerate launch recipes/dpo.py
    accelerate launch recipes/dpo.py --config recipes/configs/dpo.yaml

DPO sees only the preferences; the safety labels are dropped (TRL's collator ignores them).
Same model, data, LoRA, batch, steps and evaluation as the PRESA recipe, so the before/after
rates are directly comparable. ``DEFAULTS`` is mirrored in recipes/configs/dpo.yaml.
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
    "output_dir": "outputs/dpo_lora",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "learning_rate": 2.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "max_steps": 60,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 160,
    "beta": 0.1,
    "bf16": False,  # TRL's default; ~2x slower on CPUs
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

HYPERPARAMETER_KEYS = ("beta", "learning_rate", "max_steps", "per_device_train_batch_size",
                       "gradient_accumulation_steps", "max_length", "seed")


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config, get_quantization_config

    from llm_safepref.models import resolve_model_name

    script_args, training_args, model_args = parse_args((RecipeArguments, DPOConfig, ModelConfig), DEFAULTS, argv)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    model_path = resolve_model_name(model_args.model_name_or_path or "embedded")
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    train_dataset = load_train_dataset(script_args, tokenizer=tokenizer, max_length=training_args.max_length)
    train_dataset = train_dataset.select_columns(["prompt", "chosen", "rejected"])

    before = run_evaluation(script_args, model_path, seed=training_args.seed)
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    trainer = DPOTrainer(
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
        method="dpo", trainer=trainer, script_args=script_args, training_args=training_args, model_args=model_args,
        base_model=model_args.model_name_or_path or "embedded", before=before, after=after,
        hyperparameters=hyperparameters, nu_trajectory=None, push_to_hub=push_to_hub,
    )
    if hasattr(trainer, "end"):
        trainer.end()
    return code


if __name__ == "__main__":
    sys.exit(main())
