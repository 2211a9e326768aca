"""Which benchmark a recipe evaluates on (``--eval_benchmark``), and the evaluation itself.

Design decisions:

* ``auto`` (the default) evaluates where the benchmark matches the training data: the
  embedded data on the embedded benchmark (so ``make train`` prints its before/after table),
  a built benchmark folder given as ``--dataset_name`` on that folder. Any other dataset
  (a Hub id, a JSONL file of one's own) trains without the safety evaluation, and the run
  says so once, with the two ways to turn it on; the embedded benchmark never has to be
  built to train on one's own data.
* ``embedded`` / a path are checked before anything trains: a benchmark that is not built
  is an error at the start of the run, not after an hour of training.
* ``none`` (and its alias ``--skip_eval``) skips.
* The evaluation runs on the main process only; the other processes wait.
* The base model's evaluation goes through :mod:`llm_safepref.recipes.base_eval` (a cache keyed
  by everything it depends on, with a copy shipped for ``make train``'s defaults), unless
  ``--eval_base_cache false``; :func:`run_base_evaluation` returns the cache record with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvalPlan", "RecipeError", "resolve_eval_benchmark", "run_base_evaluation", "run_evaluation",
           "SKIP_MESSAGE"]


class RecipeError(ValueError):
    """A recipe cannot run as configured; the message says what is wrong and how to fix it."""


#: Printed once when ``auto`` skips the safety evaluation of a dataset that is not the benchmark.
SKIP_MESSAGE = (
    "Safety evaluation skipped: --dataset_name {dataset} is not the embedded benchmark, so the run has no "
    "matching evaluation set (--eval_benchmark auto). To evaluate before and after training, pass "
    "--eval_benchmark embedded (after building it once with `python -m llm_safepref.data build`), or "
    "--eval_benchmark PATH to a built benchmark folder."
)


@dataclass(frozen=True)
class EvalPlan:
    """``benchmark``: what ``llm_safepref.eval.evaluate`` receives (``"embedded"`` or a folder), or None."""

    benchmark: str | None
    reason: str  # one line for the metrics file: why this benchmark (or none)
    message: str | None = None  # printed once at the start of the run (auto skipping)


def _is_built_folder(path: str) -> bool:
    from llm_safepref.data.build import is_built

    return Path(path).is_dir() and is_built(path)


def resolve_eval_benchmark(script_args) -> EvalPlan:
    """Turn ``--eval_benchmark`` (+ ``--skip_eval``, ``--dataset_name``) into a checked plan.

    Raises:
        RecipeError: ``embedded`` while the embedded benchmark is not built, or a path that is
            not a built benchmark folder.
    """
    choice = str(script_args.eval_benchmark or "auto").strip()
    dataset = str(script_args.dataset_name)
    if script_args.skip_eval or choice.lower() == "none":
        return EvalPlan(None, "--eval_benchmark none" + (" (--skip_eval)" if script_args.skip_eval else ""))
    flag = f"--eval_benchmark {choice}"
    if choice.lower() == "auto":
        if dataset == "embedded":
            choice, flag = "embedded", "--eval_benchmark auto (--dataset_name embedded)"
        elif _is_built_folder(dataset):
            _check_split(dataset, script_args.eval_split, f"--eval_benchmark auto (--dataset_name {dataset})")
            return EvalPlan(dataset, f"auto: --dataset_name is the built benchmark folder {dataset}")
        else:
            return EvalPlan(None, "auto: the training data is not a benchmark",
                            message=SKIP_MESSAGE.format(dataset=dataset))
    if choice.lower() == "embedded":
        _check_split("embedded", script_args.eval_split, flag)
        return EvalPlan("embedded", "the embedded benchmark")
    if not Path(choice).exists():
        raise RecipeError(f"--eval_benchmark {choice}: no such folder; expected 'auto', 'embedded', 'none' or the "
                          "path of a built benchmark folder (python -m llm_safepref.data build --out PATH)")
    if not _is_built_folder(choice):
        raise RecipeError(f"--eval_benchmark {choice}: not a built benchmark folder (no completed build there; "
                          "build one with `python -m llm_safepref.data build --out PATH`)")
    _check_split(choice, script_args.eval_split, flag)
    return EvalPlan(choice, f"the benchmark folder {choice}")


def _check_split(benchmark: str, split: str, flag: str) -> None:
    """The benchmark is built and has evaluation prompts for ``split`` (read now, before training)."""
    from llm_safepref.data.adapters import load_eval_prompts

    try:
        n = len(load_eval_prompts(benchmark, split))
    except (FileNotFoundError, ValueError, KeyError) as err:
        how = ("the embedded benchmark is not built: build it once with `python -m llm_safepref.data build`, "
               if benchmark == "embedded" and isinstance(err, FileNotFoundError) else "")
        raise RecipeError(f"{flag} (split {split!r}): {how}{err}; or pass --eval_benchmark none to train without "
                          "the safety evaluation") from None
    if n == 0:
        raise RecipeError(f"{flag}: the {split!r} split has no evaluation prompts")


def run_evaluation(plan: EvalPlan, script_args, model_name_or_path: str, adapter: str | None = None,
                   seed: int = 0, *, judge=None, judge_audit=None) -> dict | None:
    """The benchmark rates of a model (+ adapter) on the main process; None when the plan skips.

    Every rate comes with its 95 % interval and per-prompt outcomes (``llm_safepref.eval``).
    ``judge`` (a judge object or a ``--judge`` spec; default the packaged judge) and
    ``judge_audit`` (an audit file: judge-corrected rates) fall back to ``script_args.eval_judge``
    / ``script_args.eval_judge_audit`` when the recipe's arguments have them.
    """
    from accelerate import PartialState

    state = PartialState()
    result = None
    if plan.benchmark is not None and state.is_main_process:
        result = _evaluate(plan, script_args, model_name_or_path, adapter, seed, judge=judge, judge_audit=judge_audit)
    state.wait_for_everyone()
    return result


def _judge_settings(script_args, judge, judge_audit) -> tuple:
    return (judge if judge is not None else getattr(script_args, "eval_judge", None),
            judge_audit if judge_audit is not None else getattr(script_args, "eval_judge_audit", None))


def _evaluate(plan: EvalPlan, script_args, model_name_or_path: str, adapter: str | None, seed: int, *,
              judge=None, judge_audit=None) -> dict:
    from llm_safepref.eval import evaluate

    judge, judge_audit = _judge_settings(script_args, judge, judge_audit)
    return evaluate(
        model_name_or_path, adapter=adapter, split=script_args.eval_split, limit=script_args.eval_limit,
        limit_per_category=script_args.eval_limit_per_category,
        categories=getattr(script_args, "eval_categories", None), benchmark=plan.benchmark,
        max_new_tokens=script_args.eval_max_new_tokens, batch_size=script_args.eval_batch_size, seed=seed,
        judge=judge, judge_audit=judge_audit,
    )


def run_base_evaluation(plan: EvalPlan, script_args, model_name_or_path: str, seed: int = 0, *, judge=None,
                        judge_audit=None, revision: str | None = None,
                        shipped_dir: Path | None = None) -> tuple[dict | None, dict | None]:
    """``(result, cache record)`` of the base model (main process; ``(None, None)`` elsewhere or when skipping).

    Through the base-evaluation cache (:func:`llm_safepref.recipes.base_eval.cached_base_evaluation`)
    unless ``script_args.eval_base_cache`` is false; the record says whether the result came from
    the cache and from which file.
    """
    from accelerate import PartialState

    state = PartialState()
    result = record = None
    if plan.benchmark is not None and state.is_main_process:
        from llm_safepref.recipes.base_eval import cached_base_evaluation

        judge, judge_audit = _judge_settings(script_args, judge, judge_audit)
        result, record = cached_base_evaluation(
            lambda resolved: _evaluate(plan, script_args, model_name_or_path, None, seed, judge=resolved,
                                       judge_audit=judge_audit),
            model=model_name_or_path, use_cache=bool(getattr(script_args, "eval_base_cache", True)),
            shipped_dir=shipped_dir, benchmark=plan.benchmark, split=script_args.eval_split,
            limit=script_args.eval_limit, limit_per_category=script_args.eval_limit_per_category,
            categories=getattr(script_args, "eval_categories", None), max_new_tokens=script_args.eval_max_new_tokens,
            batch_size=script_args.eval_batch_size, seed=seed, judge=judge, judge_audit=judge_audit,
            revision=revision,
        )
    state.wait_for_everyone()
    return result, record
