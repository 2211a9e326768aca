"""The one flow every recipe runs: parse, check, evaluate the base, build, train, save, evaluate, publish.

``recipes/presa_lora.py``, ``recipes/dpo.py`` and ``recipes/kto.py`` each declare a
:class:`Recipe` (the TRL config class, the trainer, the dataset columns, the defaults file,
the hyperparameters worth recording) and call :func:`run_recipe`.

Design decisions:

* Every check that can fail does so before anything trains or evaluates: the data are
  loaded and validated, the evaluation benchmark is resolved and read, and a model without a
  chat template under ``--conversational true`` is an error that says how to fix it. Such an
  error is printed as ``error: ...`` (no traceback) and the recipe exits with status 2.
* ``push_to_hub`` is taken out of the TRL config before the trainer is built (TRL would create
  the repo at construction, so a Hub failure would kill the run before training) and done by
  :func:`llm_safepref.publish.publish_adapter` after everything is saved locally.
* Secrets never reach a file: ``hub_token`` is read into this run's memory and cleared in
  the TRL config before the trainer exists, so ``training_args.bin`` (pickled by transformers
  into the output folder and every checkpoint) holds no token; the metrics file and the model
  card go through :mod:`llm_safepref.core.provenance` (``run_record`` / ``write_json`` /
  ``redact``), whose command line is redacted too.
* Evaluation, file writing and publishing run on the main process only; the others wait.
* The base model's evaluation comes from the base-evaluation cache when nothing it depends on
  changed (:mod:`llm_safepref.recipes.base_eval`; a copy for ``make train``'s defaults ships with
  the package), so a run spends its time on training and the trained model's evaluation. The run
  prints where ``before`` came from and ``run_metrics.json`` records it (``base_eval_cache``);
  ``--eval_base_cache false`` evaluates every time, ``--eval_base_only true`` stops after it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm_safepref.recipes.arguments import RecipeArguments, parse_args  # noqa: E402
from llm_safepref.recipes.evaluation import (  # noqa: E402
    EvalPlan, RecipeError, resolve_eval_benchmark, run_base_evaluation, run_evaluation)

__all__ = ["Recipe", "RecipeRun", "run_recipe", "model_init_kwargs", "load_train_dataset", "check_chat_template",
           "save_trained", "RATE_KEYS", "before_after_table"]

#: The headline rates of the evaluation, in the console table.
RATE_KEYS = ("harmful_compliance_rate", "over_refusal_rate", "instruction_following_rate")
#: Recorded for every recipe, next to the recipe's own hyperparameters.
_MODEL_HYPERPARAMETERS = ("lora_r", "lora_alpha", "load_in_4bit")


def _all_columns(pairs, training_args):
    return pairs


@dataclass(frozen=True)
class Recipe:
    """What one recipe adds to the shared flow.

    Attributes:
        method: the method's name in the metrics, the card and the table (``"presa"``).
        defaults: name of the defaults file ``llm_safepref/recipes/configs/<defaults>.yaml``.
        config_class: the TRL config dataclass (``PresaConfig``, ``DPOConfig``, ``KTOConfig``).
        build_trainer: called with ``model, args, train_dataset, processing_class,
            quantization_config, peft_config`` (keywords); returns the trainer. A trainer
            class itself qualifies.
        training_dataset: ``(pairs, training_args) -> dataset`` the trainer trains on; ``pairs``
            has ``prompt, chosen, rejected, chosen_is_safe, rejected_is_safe`` (+ ``source``).
        hyperparameters: names of ``training_args`` fields recorded in the metrics and the card.
        description: the ``--help`` text (the recipe's docstring).
    """

    method: str
    defaults: str
    config_class: type
    build_trainer: Callable[..., Any]
    training_dataset: Callable[[Any, Any], Any] = _all_columns
    hyperparameters: tuple[str, ...] = ()
    description: str | None = None


def model_init_kwargs(model_args) -> dict[str, Any]:
    """``from_pretrained`` kwargs of TRL's ``ModelConfig`` (dtype, attention, revision)."""
    kwargs: dict[str, Any] = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from trl import get_kbit_device_map

        kwargs["device_map"] = get_kbit_device_map()
    return kwargs


def check_chat_template(tokenizer, model_name: str, conversational: bool) -> None:
    """A chat-formatted run needs a chat template: fail before training, saying how to fix it."""
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"the tokenizer of {model_name} has no chat template, but the recipe presents the data as chat "
            "messages (--conversational true, the default). Pass --conversational false to train on plain "
            "prompt + response text, or use a model whose tokenizer has a chat template (an instruct/chat model)."
        )


def load_train_dataset(script_args: RecipeArguments, *, tokenizer=None, max_length: int | None = None):
    """The preference pairs with safety labels, loaded and validated by the data package.

    Rows whose prompt alone is longer than ``max_length`` tokens are an error (or dropped with
    ``--drop_invalid``) before anything trains.
    """
    from llm_safepref.data import load_preference_dataset

    limit = script_args.max_prompt_length or max_length
    dataset = load_preference_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        conversational=script_args.conversational,
        drop_invalid=script_args.drop_invalid,
        max_length=limit,
        tokenizer=tokenizer if limit is not None else None,
    )
    if script_args.train_limit is not None:
        dataset = dataset.select(range(min(script_args.train_limit, len(dataset))))
    return dataset


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


class RecipeRun:
    """The state of one run; each method is one step of :func:`run_recipe`."""

    def __init__(self, recipe: Recipe, script_args, training_args, model_args):
        self.recipe = recipe
        self.script_args, self.training_args, self.model_args = script_args, training_args, model_args
        # Publishing happens after training (never at trainer construction), with a token that
        # lives only here: cleared in the config, it is in no pickled training_args.bin.
        self.push_to_hub, training_args.push_to_hub = bool(training_args.push_to_hub), False
        self._hub_token, training_args.hub_token = training_args.hub_token, None
        self.base_model = model_args.model_name_or_path or "embedded"
        self.output_dir = Path(training_args.output_dir)
        self.eval_plan: EvalPlan | None = None
        self.tokenizer = self.model_path = self.train_dataset = self.trainer = None
        self.before: dict | None = None
        self.after: dict | None = None
        self.base_eval_cache: dict | None = None  # where `before` came from (run_metrics.json)

    @classmethod
    def parse(cls, recipe: Recipe, argv: list[str] | None = None) -> "RecipeRun":
        """Defaults file < ``--config`` < command line."""
        from trl import ModelConfig

        script_args, training_args, model_args = parse_args(
            (RecipeArguments, recipe.config_class, ModelConfig), recipe.defaults, argv,
            description=recipe.description)
        return cls(recipe, script_args, training_args, model_args)

    @property
    def is_main_process(self) -> bool:
        from accelerate import PartialState

        return PartialState().is_main_process

    def prepare(self) -> None:
        """Tokenizer, the data and the evaluation benchmark, all checked before anything runs."""
        from transformers import AutoTokenizer

        from llm_safepref.models import resolve_model_name

        self.model_path = resolve_model_name(self.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, revision=self.model_args.model_revision)
        check_chat_template(self.tokenizer, self.base_model, self.script_args.conversational)
        self.eval_plan = resolve_eval_benchmark(self.script_args)
        pairs = load_train_dataset(self.script_args, tokenizer=self.tokenizer, max_length=self.training_args.max_length)
        self.train_dataset = self.recipe.training_dataset(pairs, self.training_args)
        if self.eval_plan.message and self.is_main_process:
            print(self.eval_plan.message, flush=True)

    def evaluate(self, trained: bool = False) -> dict | None:
        """The base model (``trained=False``) or the trained one, on the plan's benchmark."""
        seed = self.training_args.seed
        if not trained:
            result, self.base_eval_cache = run_base_evaluation(self.eval_plan, self.script_args, self.model_path,
                                                               seed=seed, revision=self.model_args.model_revision)
            if self.base_eval_cache is not None:
                print(_cache_line(self.base_eval_cache), flush=True)
            return result
        adapter = str(self.output_dir) if self.model_args.use_peft else None
        model = self.model_path if adapter else str(self.output_dir)
        return run_evaluation(self.eval_plan, self.script_args, model, adapter=adapter, seed=seed)

    def build(self) -> None:
        from trl import get_peft_config, get_quantization_config

        args = self.training_args
        args.model_init_kwargs = {**model_init_kwargs(self.model_args), **(args.model_init_kwargs or {})}
        self.trainer = self.recipe.build_trainer(
            model=self.model_path, args=args, train_dataset=self.train_dataset, processing_class=self.tokenizer,
            quantization_config=get_quantization_config(self.model_args),
            peft_config=get_peft_config(self.model_args),
        )

    def train(self) -> None:
        self.trainer.train(resume_from_checkpoint=self.training_args.resume_from_checkpoint)

    def save(self) -> None:
        save_trained(self.trainer, str(self.output_dir), self.base_model)  # PresaTrainer adds lagrange.json

    # ---- outputs
    def hyperparameters(self) -> dict[str, Any]:
        values = {k: getattr(self.training_args, k) for k in self.recipe.hyperparameters}
        values.update({k: getattr(self.model_args, k) for k in _MODEL_HYPERPARAMETERS})
        return values

    def nu_trajectory(self) -> list | None:
        trajectory = getattr(self.trainer, "nu_trajectory", None)
        return [(p["step"], p["nu"]) for p in trajectory()] if callable(trajectory) else None

    def metrics(self) -> dict[str, Any]:
        """``run_metrics.json``: the run record (command, git revision, versions, ...) and the results."""
        from llm_safepref.core.provenance import run_record

        train_logs = [e for e in self.trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        return run_record(
            method=self.recipe.method,
            base_model=self.base_model,
            dataset=self.script_args.dataset_name,
            eval_benchmark=self.eval_plan.benchmark,
            eval_benchmark_reason=self.eval_plan.reason,
            before=self.before,
            base_eval_cache=self.base_eval_cache,
            reference_cache=(self.trainer.reference_cache_report()
                             if hasattr(self.trainer, "reference_cache_report") else None),
            after=self.after,
            final_train_loss=train_logs[-1]["loss"] if train_logs else None,
            global_step=self.trainer.state.global_step,
            nu_trajectory=self.nu_trajectory(),
            hyperparameters=self.hyperparameters(),
        )

    def repo_id(self) -> str:
        return self.script_args.hub_repo_id or self.training_args.hub_model_id or self.output_dir.name

    def write_outputs(self) -> dict[str, Any]:
        """Metrics file(s) and the model card (main process)."""
        from llm_safepref.core.provenance import redact, write_json
        from llm_safepref.publish import write_model_card

        metrics = self.metrics()
        for path in filter(None, [self.output_dir / "run_metrics.json", self.script_args.results_file]):
            write_json(path, metrics)
        method = self.recipe.method
        # The card shows the headline rates with their 95% intervals; everything else stays in run_metrics.json.
        eval_table = {name: _card_row(rates) for name, rates in {"base": self.before, method: self.after}.items()
                      if rates is not None} or None
        write_model_card(
            self.output_dir, base_model=self.base_model, method=method, dataset=str(self.script_args.dataset_name),
            hyperparameters=redact(metrics["hyperparameters"]), eval_table=eval_table,
            nu_trajectory=metrics["nu_trajectory"], repo_id=self.repo_id() if self.push_to_hub else None,
        )
        return metrics

    def publish(self) -> int:
        """Upload the saved folder (only with ``--push_to_hub``); 1 when publishing failed, else 0."""
        if not self.push_to_hub:
            return 0
        from llm_safepref.publish import PublishError, publish_adapter

        repo_id = self.repo_id()
        try:
            url = publish_adapter(self.output_dir, repo_id, private=bool(self.training_args.hub_private_repo),
                                  token=self._hub_token)
        except PublishError as err:  # the local adapter, metrics and card stay as saved
            print(f"ERROR: publishing failed: {err}", file=sys.stderr)
            return 1
        print(f"Published {self.output_dir} to {repo_id}: {url}")
        return 0

    def report(self) -> None:
        method = self.recipe.method
        print(f"\n{method} run finished: {self.trainer.state.global_step} steps, outputs in {self.output_dir}")
        table = before_after_table({"base": self.before, method: self.after})
        if table:
            print(table)

    def finish(self) -> int:
        """Metrics + card, publish, the table (main process); returns the exit code."""
        from accelerate import PartialState

        state = PartialState()
        code = 0
        if state.is_main_process:
            self.write_outputs()
            code = self.publish()
            self.report()
        state.wait_for_everyone()
        if hasattr(self.trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
            self.trainer.end()
        return code


def _cache_line(record: dict) -> str:
    """One line saying where the base model's evaluation came from."""
    if record.get("hit"):
        by = record.get("evaluated_by") or {}
        return (f"Base evaluation: from the {record['source']} base-evaluation cache, {record['file']} (evaluated "
                f"{by.get('date')} on {by.get('machine')}); --eval_base_cache false re-evaluates.")
    if record.get("source") == "evaluated":
        return f"Base evaluation: evaluated and stored in the cache, {record['file']}."
    return f"Base evaluation: evaluated, not cached ({record.get('reason')})."


def _card_row(rates: dict) -> dict:
    """The model card's row of one evaluation: each headline rate, its interval as text, and the prompt count."""
    from llm_safepref.core.tables import format_with_ci

    row: dict = {}
    for key in RATE_KEYS:
        row[key] = rates.get(key)
        if rates.get(f"{key}_ci") is not None:
            row[f"{key} (95% CI)"] = format_with_ci(rates.get(key), rates.get(f"{key}_ci"))
    if rates.get("n_prompts") is not None:
        row["n_prompts"] = rates["n_prompts"]
    return row


def before_after_table(evaluations: dict[str, dict | None]) -> str:
    """The console table of :data:`RATE_KEYS` per model, each rate with its 95 % interval over prompts.

    ``0.170 [0.109, 0.256]`` (``core.tables.format_with_ci``); an evaluation without intervals
    prints the rate alone. Empty when no evaluation ran.
    """
    from llm_safepref.core.tables import format_with_ci, text_table

    rows = [[name, *(format_with_ci(rates.get(k), rates.get(f"{k}_ci")) for k in RATE_KEYS)]
            for name, rates in evaluations.items() if rates is not None]
    if not rows:
        return ""
    note = "95 % intervals over prompts (Wilson)"
    return text_table(["model", *RATE_KEYS], rows) + f"\n({note})"


def run_recipe(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Run ``recipe`` on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: trained and saved (and published if asked); 1: trained and saved, publishing failed;
    2: the configuration was refused before anything ran (the message says why).
    """
    from llm_safepref.data import DataValidationError

    run = RecipeRun.parse(recipe, argv)
    try:
        run.prepare()
    except (RecipeError, DataValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run.before = run.evaluate()
    if run.script_args.eval_base_only:
        return _finish_base_only(run)
    run.build()
    run.train()
    run.save()
    run.after = run.evaluate(trained=True)
    return run.finish()


def _finish_base_only(run: RecipeRun) -> int:
    """``--eval_base_only``: ``<output_dir>/base_eval.json`` (run record, where ``before`` came from, the
    evaluation) and the base rates (main process); nothing trains."""
    if run.is_main_process:
        if run.before is None:
            print("error: --eval_base_only with no evaluation benchmark (the run resolved --eval_benchmark to none)",
                  file=sys.stderr)
            return 2
        from llm_safepref.core.provenance import run_record, write_json

        path = write_json(run.output_dir / "base_eval.json", run_record(
            method="base", base_model=run.base_model, eval_benchmark=run.eval_plan.benchmark,
            base_eval_cache=run.base_eval_cache, before=run.before))
        print(before_after_table({"base": run.before}))
        print(f"wrote {path}")
    return 0
