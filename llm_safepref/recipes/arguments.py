"""The recipes' command line: ``RecipeArguments``, the defaults files, and the parser.

Design decisions:

* One source of defaults: ``llm_safepref/recipes/configs/<name>.yaml`` (package data). The
  parser takes them as its defaults, so ``accelerate launch recipes/presa_lora.py`` with no
  argument is a complete run; ``--config my.yaml`` replaces the keys it names and a flag
  replaces both (defaults < ``--config`` < command line). No recipe holds a copy.
* Flags follow TRL's spelling, ``--snake_case``; ``--kebab-case`` is accepted too (as
  ``HfArgumentParser`` does), and ``--config=PATH`` as well as ``--config PATH``.
* A key of a defaults file that no dataclass knows is an error (a typo would otherwise be a
  silently ignored setting).
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments

from llm_safepref.recipes.defaults import CONFIG_DIR, config_path, load_defaults

__all__ = ["RecipeArguments", "CONFIG_DIR", "config_path", "load_defaults", "build_parser", "parse_args"]

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
        metadata={"help": "Present prompts and responses as chat messages (needs a model with a chat template); "
                          "false: plain prompt + response text."},
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
    eval_benchmark: str = field(
        default="auto",
        metadata={"help": "Safety evaluation before and after training: 'auto' (the embedded benchmark when "
                          "--dataset_name is embedded or a built benchmark folder, else none), 'embedded', 'none', "
                          "or the path of a built benchmark folder (python -m llm_safepref.data build --out PATH)."},
    )
    skip_eval: bool = field(default=False, metadata={"help": "Same as --eval_benchmark none."})
    eval_split: str = field(default="test", metadata={"help": "Split of the evaluation benchmark."})
    eval_limit: int | None = field(
        default=None, metadata={"help": "Evaluate on a fixed stratified subset of at most N prompts in all."})
    eval_limit_per_category: int | None = field(
        default=None,
        metadata={"help": "Evaluate on at most N prompts of each category (harmful, benign, look-dangerous)."},
    )
    eval_categories: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluate only these categories (harmful, benign, look_dangerous, contrast_harmful), each "
                          "optionally with its own cap in place of --eval_limit_per_category: 'look_dangerous:all', "
                          "'harmful:50'. Default: every category of the benchmark."},
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Generation length of the evaluation."})
    eval_judge: str = field(
        default="packaged",
        metadata={"help": "Judge of the evaluation: 'packaged' (the toolkit's judge), a Hugging Face "
                          "sequence-classification model (Hub id or local path), or a Python callable "
                          "'module:function' taking (prompts, responses). Recorded in every results file."},
    )
    eval_judge_audit: str | None = field(
        default=None,
        metadata={"help": "Audit file of the judge's measured sensitivity / specificity (results/judge_audit.json "
                          "schema): adds judge-corrected rates (Rogan–Gladen) with intervals."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Generation batch size of the evaluation."})
    eval_base_cache: bool = field(
        default=True,
        metadata={"help": "Reuse the base model's evaluation when nothing it depends on changed (model weights, "
                          "benchmark prompts, split, limits, generation, seed, judge, threads, library versions): "
                          "looked up in <cache>/base_eval/, then in the copy shipped with the package; a miss "
                          "evaluates and stores it. run_metrics.json says where 'before' came from. false: always "
                          "evaluate the base model."},
    )
    eval_base_only: bool = field(
        default=False,
        metadata={"help": "Evaluate the base model (through the cache, storing a miss), print its rates and stop: "
                          "nothing trains. How the shipped base evaluation is produced (docs/recipes.md)."},
    )
    results_file: str | None = field(
        default=None, metadata={"help": "Also write the run's metrics JSON here (default: <output_dir>/run_metrics.json)."}
    )
    hub_repo_id: str | None = field(
        default=None,
        metadata={"help": "Repo to publish to with --push_to_hub (default: hub_model_id, else the output folder name)."},
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the recipe's docstring as written; show every flag's default."""


def build_parser(config_types: tuple, defaults: str | dict[str, Any], *, prog: str | None = None,
                 description: str | None = None):
    """A ``TrlParser`` over ``config_types`` whose defaults are the recipe's defaults file."""
    from trl import TrlParser

    values = load_defaults(defaults) if isinstance(defaults, str) else dict(defaults)
    source = config_path(defaults) if isinstance(defaults, str) else "the defaults given"
    epilog = textwrap.fill(
        f"Defaults: {source}. Override with --config my.yaml (its keys replace the defaults) and flags (which "
        "replace both). Flags are --snake_case; --kebab-case is accepted. See docs/recipes.md.", width=100)
    parser = TrlParser(config_types, prog=prog, description=description, epilog=epilog,
                       formatter_class=_HelpFormatter)
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown[::2]} (not a flag of {[t.__name__ for t in config_types]})")
    return parser


def _normalise_config_flag(argv: list[str]) -> list[str]:
    """``--config=PATH`` -> ``--config PATH`` (TrlParser reads only the two-token form)."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            out += ["--config", arg.split("=", 1)[1]]
        else:
            out.append(arg)
    return out


def parse_args(config_types: tuple, defaults: str | dict[str, Any], argv: list[str] | None = None, *,
               prog: str | None = None, description: str | None = None):
    """Parse ``(RecipeArguments, <Method>Config, ModelConfig)``: defaults < ``--config`` YAML < command line.

    ``defaults`` is the name of a file in ``CONFIG_DIR`` (``"presa_lora"``) or a mapping.
    """
    import sys

    parser = build_parser(config_types, defaults, prog=prog, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args_and_config(args=_normalise_config_flag(argv))
