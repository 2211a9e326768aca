"""The recipes' shared plumbing: arguments, defaults, data, evaluation, outputs, publishing.

The user-facing scripts stay in ``recipes/`` (``accelerate launch recipes/presa_lora.py`` is the
main job); each declares a :class:`Recipe` (its TRL config and trainer, its dataset columns,
its defaults file) and calls :func:`run_recipe`, so the flow exists once:

    parse (defaults file < --config < flags) -> prepare (tokenizer, data, evaluation benchmark:
    every check before anything runs) -> evaluate the base -> build the trainer -> train ->
    save -> evaluate again -> metrics + model card -> publish (--push_to_hub) -> table

Design decisions:

* The defaults of every recipe live in one place, ``llm_safepref/recipes/configs/<name>.yaml``
  (package data): the parser's defaults, with ``--config my.yaml`` and flags on top.
  ``python -m llm_safepref.recipes NAME`` prints one, to copy and edit.
* ``--eval_benchmark auto`` evaluates the embedded data on the embedded benchmark and trains
  on any other data without one (saying how to turn it on); see :mod:`.evaluation`.
* No secret reaches a file the toolkit writes or publishes; see :mod:`.run`.

Modules: :mod:`.arguments` (``RecipeArguments``, defaults files, parser), :mod:`.evaluation`
(``--eval_benchmark``), :mod:`.run` (``Recipe``, ``run_recipe`` and its steps).
"""

from __future__ import annotations

from llm_safepref._runtime import lazy_exports

#: Public names, loaded on first use (``import llm_safepref.recipes`` imports no TRL): name -> module.
_LAZY = {
    **dict.fromkeys(("CONFIG_DIR", "config_path", "load_defaults", "recipe_names"), "llm_safepref.recipes.defaults"),
    **dict.fromkeys(("RecipeArguments", "parse_args", "build_parser"), "llm_safepref.recipes.arguments"),
    **dict.fromkeys(("EvalPlan", "RecipeError", "SKIP_MESSAGE", "resolve_eval_benchmark", "run_evaluation"),
                    "llm_safepref.recipes.evaluation"),
    **dict.fromkeys(("RATE_KEYS", "Recipe", "RecipeRun", "check_chat_template", "load_train_dataset",
                     "model_init_kwargs", "run_recipe", "save_trained"), "llm_safepref.recipes.run"),
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
