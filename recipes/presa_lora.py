"""Align a causal LM with PRESA (preferences + safety labels) as a LoRA adapter.

    accelerate launch recipes/presa_lora.py                       # embedded model + data, 2-core CPU
    accelerate launch recipes/presa_lora.py --config recipes/configs/presa_lora.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/presa_lora.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name PKU-Alignment/PKU-SafeRLHF

Flow: parse -> evaluate the base model -> train (PresaTrainer) -> save adapter + lagrange.json
-> evaluate again -> metrics + model card -> publish (only with --push_to_hub) -> print the
before/after table. Every option of ``PresaConfig``, TRL's ``ModelConfig`` and
``RecipeArguments`` (recipes/_recipe_common.py) is a flag; ``DEFAULTS`` below is the
no-argument run (mirrored in recipes/configs/presa_lora.yaml).
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

#: The no-argument run: embedded SmolLM2-135M-Instruct, embedded benchmark, LoRA, 2-core CPU.
DEFAULTS = {
    "model_name_or_path": "embedded",
    "dataset_name": "embedded",
    "conversational": True,
    "drop_invalid": True,
    "max_prompt_length": 128,
    "output_dir": "outputs/presa_lora",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "learning_rate": 1.5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "max_steps": 60,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 160,
    "pref_loss": "cpl",
    "cpl_alpha": 0.1,
    "cpl_bias": 1.0,
    "safety_beta": 0.1,
    "safety_delta": 0.6,
    "safety_exclude_safe_rejected": True,
    "nu_init": 1.0,
    "nu_lr": 0.5,
    "nu_max": 10.0,
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

HYPERPARAMETER_KEYS = (
    "pref_loss", "cpl_alpha", "cpl_bias", "cpl_reference", "beta", "safety_beta", "safety_delta",
    "safety_ref_point", "safety_safe_weight", "safety_unsafe_weight",
    "safety_exclude_safe_rejected", "nu_init", "nu_lr", "nu_max", "learning_rate", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "seed",
)


def main(argv: list[str] | None = None) -> int:
    from trl import ModelConfig, get_peft_config, get_quantization_config

    from llm_safepref.models import resolve_model_name
    from llm_safepref.presa_config import PresaConfig
    from llm_safepref.presa_trainer import PresaTrainer

    script_args, training_args, model_args = parse_args((RecipeArguments, PresaConfig, ModelConfig), DEFAULTS, argv)
    # Publish after training, never at trainer construction.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    model_path = resolve_model_name(model_args.model_name_or_path or "embedded")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    train_dataset = load_train_dataset(script_args, tokenizer=tokenizer, max_length=training_args.max_length)

    before = run_evaluation(script_args, model_path, seed=training_args.seed)

    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    trainer = PresaTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_trained(trainer, training_args.output_dir, model_args.model_name_or_path or "embedded")  # + lagrange.json for PRESA

    adapter = training_args.output_dir if model_args.use_peft else None
    after = run_evaluation(script_args, model_path if adapter else training_args.output_dir, adapter=adapter,
                           seed=training_args.seed)
    hyperparameters = {k: getattr(training_args, k) for k in HYPERPARAMETER_KEYS}
    hyperparameters.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                           load_in_4bit=model_args.load_in_4bit)
    code = finish_run(
        method="presa", trainer=trainer, script_args=script_args, training_args=training_args,
        model_args=model_args, base_model=model_args.model_name_or_path or "embedded", before=before, after=after,
        hyperparameters=hyperparameters, nu_trajectory=[(p["step"], p["nu"]) for p in trainer.nu_trajectory()],
        push_to_hub=push_to_hub,
    )
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return code


if __name__ == "__main__":
    sys.exit(main())
