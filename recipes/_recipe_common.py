"""Shared plumbing of the recipes (``presa_lora.py``, ``dpo.py``, ``kto.py``).

Design decisions:

* The three recipes train on the same data and are evaluated by the same harness, so the
  parts that must be identical live here: argument defaults, data loading, the
  base/after evaluation, the metrics file, the model card and the optional publish step.
  No algorithm logic: each recipe builds its own TRL trainer.
* Defaults are embedded in each recipe (``DEFAULTS``) and applied before ``--config`` and
  the command line, so ``accelerate launch recipes/presa_lora.py`` with no argument is a
  complete run. ``recipes/configs/*.yaml`` carry the same values for reading and editing
  (a test checks that they agree).
* Evaluation and file writing run on the main process only; the others wait.
* ``push_to_hub`` is taken out of the TRL config before the trainer is built (TRL would
  create the repo at construction, so a Hub failure would kill the run before training)
  and done by ``llm_safepref.publish.publish_adapter`` after everything is saved locally.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import ScriptArguments  # noqa: E402

__all__ = ["RecipeArguments", "parse_args", "model_init_kwargs", "load_train_dataset", "run_evaluation",
           "finish_run", "machine_description"]


@dataclass
class RecipeArguments(ScriptArguments):
    """Data and evaluation options shared by the recipes (TRL's ``ScriptArguments`` plus these)."""

    dataset_name: str | None = field(
        default="embedded",
        metadata={"help": "'embedded' (the toolkit's benchmark), a Hub id, or a local file / folder. A dataset in "
                          "the PKU-SafeRLHF schema is recognised by its columns and converted."},
    )
    conversational: bool = field(
        default=True,
        metadata={"help": "Present prompts and responses as chat messages (the model's chat template)."},
    )
    drop_invalid: bool = field(
        default=False, metadata={"help": "Drop invalid rows with a warning instead of failing on the first one."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Prompts longer than this many tokens are an error before training (dropped with a warning "
                          "under --drop_invalid). Default: the trainer's max_length."},
    )
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip the before/after evaluation (smoke runs)."})
    eval_split: str = field(default="test", metadata={"help": "Split of the evaluation benchmark."})
    eval_limit: int | None = field(
        default=None, metadata={"help": "Evaluate on a fixed stratified subset of at most N prompts in all."})
    eval_limit_per_category: int | None = field(
        default=None,
        metadata={"help": "Evaluate on at most N prompts of each category (harmful, benign, look-dangerous)."},
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Generation length of the evaluation."})
    eval_batch_size: int = field(default=8, metadata={"help": "Generation batch size of the evaluation."})
    results_file: str | None = field(
        default=None, metadata={"help": "Also write the run's metrics JSON here (default: <output_dir>/run_metrics.json)."}
    )
    hub_repo_id: str | None = field(
        default=None,
        metadata={"help": "Repo to publish to with --push_to_hub (default: hub_model_id, else the output folder name)."},
    )


def parse_args(config_types: tuple, defaults: dict[str, Any], argv: list[str] | None = None):
    """Parse ``(RecipeArguments, <Method>Config, ModelConfig)``: defaults < ``--config`` YAML < command line."""
    from trl import TrlParser

    parser = TrlParser(config_types)
    parser.set_defaults_with_config(**defaults)
    return parser.parse_args_and_config(args=argv)


def model_init_kwargs(model_args) -> dict[str, Any]:
    """``from_pretrained`` kwargs of TRL's ``ModelConfig`` (dtype, attention, revision)."""
    kwargs: dict[str, Any] = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_kbit_device_map

        kwargs["device_map"] = get_kbit_device_map()
    return kwargs


def load_train_dataset(script_args: RecipeArguments, *, tokenizer=None, max_length: int | None = None):
    """The preference pairs with safety labels, loaded and validated by the data package.

    Rows whose prompt alone is longer than ``max_length`` tokens are an error (or dropped with
    ``--drop_invalid``) before anything trains.
    """
    from llm_safepref.data import load_preference_dataset

    dataset = load_preference_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        conversational=script_args.conversational,
        drop_invalid=script_args.drop_invalid,
        max_length=script_args.max_prompt_length or max_length,
        tokenizer=tokenizer if (script_args.max_prompt_length or max_length) is not None else None,
    )
    if script_args.train_limit is not None:
        dataset = dataset.select(range(min(script_args.train_limit, len(dataset))))
    return dataset


def run_evaluation(script_args: RecipeArguments, model_name_or_path: str, adapter: str | None = None,
                   seed: int = 0) -> dict | None:
    """The benchmark rates of a model (+ adapter), computed on the main process only."""
    from accelerate import PartialState

    state = PartialState()
    result = None
    if not script_args.skip_eval and state.is_main_process:
        from llm_safepref.eval import evaluate

        result = evaluate(
            model_name_or_path, adapter=adapter, split=script_args.eval_split, limit=script_args.eval_limit,
            limit_per_category=script_args.eval_limit_per_category,
            max_new_tokens=script_args.eval_max_new_tokens, batch_size=script_args.eval_batch_size, seed=seed,
        )
    state.wait_for_everyone()
    return result


def machine_description() -> str:
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{where}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def _command() -> str:
    """The command line of this run (``accelerate launch`` sets ACCELERATE_* variables in its children)."""
    launched = any(k.startswith("ACCELERATE_MIXED_PRECISION") for k in os.environ) or "LOCAL_RANK" in os.environ
    return ("accelerate launch " if launched else "python ") + " ".join(shlex.quote(a) for a in sys.argv)


RATE_KEYS = ("harmful_compliance_rate", "over_refusal_rate", "instruction_following_rate")


def _table(rows: dict[str, dict | None]) -> str:
    lines = [f"{'model':<12}" + "".join(f"{k:>30}" for k in RATE_KEYS)]
    for name, rates in rows.items():
        if rates is None:
            continue
        lines.append(f"{name:<12}" + "".join(f"{rates.get(k, float('nan')):>30.3f}" for k in RATE_KEYS))
    return "\n".join(lines)


def finish_run(
    *,
    method: str,
    trainer,
    script_args: RecipeArguments,
    training_args,
    model_args,
    base_model: str,
    before: dict | None,
    after: dict | None,
    hyperparameters: dict[str, Any],
    nu_trajectory: list | None,
    push_to_hub: bool,
) -> int:
    """Write metrics + model card, publish if asked, print the before/after table; return the exit code."""
    from accelerate import PartialState

    state = PartialState()
    output_dir = Path(training_args.output_dir)
    exit_code = 0
    if state.is_main_process:
        train_logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        metrics = {
            "method": method,
            "base_model": base_model,
            "dataset": script_args.dataset_name,
            "before": before,
            "after": after,
            "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
            "global_step": trainer.state.global_step,
            "nu_trajectory": nu_trajectory,
            "hyperparameters": hyperparameters,
            "command": _command(),
            "date": _dt.date.today().isoformat(),
            "machine": machine_description(),
        }
        for path in filter(None, [output_dir / "run_metrics.json", script_args.results_file]):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(metrics, indent=2) + "\n")

        eval_table = {k: v for k, v in {"base": before, method: after}.items() if v is not None} or None
        repo_id = script_args.hub_repo_id or training_args.hub_model_id or output_dir.name
        try:
            from llm_safepref.publish import write_model_card

            write_model_card(
                output_dir, base_model=base_model, method=method, dataset=str(script_args.dataset_name),
                hyperparameters=hyperparameters, eval_table=eval_table, nu_trajectory=nu_trajectory,
                repo_id=repo_id if push_to_hub else None,
            )
        except ImportError:  # the publish module is optional for training
            trainer.create_model_card(model_name=output_dir.name)

        if push_to_hub:
            # ---- publishing (after everything is saved; a failure leaves the local adapter intact)
            from llm_safepref.publish import PublishError, publish_adapter

            try:
                url = publish_adapter(output_dir, repo_id, private=bool(training_args.hub_private_repo),
                                      token=training_args.hub_token)
                print(f"Published {output_dir} to {repo_id}: {url}")
            except PublishError as err:
                print(f"ERROR: publishing failed: {err}", file=sys.stderr)
                exit_code = 1

        print(f"\n{method} run finished: {trainer.state.global_step} steps, outputs in {output_dir}")
        if before is not None or after is not None:
            print(_table({"base": before, method: after}))
    state.wait_for_everyone()
    return exit_code


def save_trained(trainer, output_dir: str, base_model: str) -> None:
    """Save the model; a LoRA adapter records the base model's Hub id, not a local cache folder.

    ``adapter_config.json`` would otherwise name the local folder of the converted embedded
    model, and ``AutoPeftModelForCausalLM.from_pretrained(repo_id)`` would fail for anyone
    who downloads the published adapter. A local base model path is kept as it is.
    """
    from llm_safepref.publish import hub_base_model_id

    model = trainer.accelerator.unwrap_model(trainer.model)
    for config in (getattr(model, "peft_config", None) or {}).values():
        config.base_model_name_or_path = hub_base_model_id(base_model) or config.base_model_name_or_path
    trainer.save_model(output_dir)
