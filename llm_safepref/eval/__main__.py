"""``python -m llm_safepref.eval [--model embedded] [--adapter DIR] [--split test] [--limit N] [--out FILE]``

Flags follow the toolkit's convention (``llm_safepref.core.cli.ToolParser``): ``--snake_case``,
``--kebab-case`` accepted (so ``--batch-size`` and ``--batch_size`` both work). ``--out`` writes
the metrics with the run record (``llm_safepref.core.provenance``) and a Markdown table. Every
rate is printed with its 95 % interval over prompts. ``--judge`` picks another judge (an HF
classifier or a callable, ``llm_safepref.judge.plugins``); ``--judge_audit`` adds the
judge-corrected rates (``llm_safepref.eval.correction``). A ``--judge`` that cannot be loaded
is an ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import json
import shlex
import sys

from llm_safepref._runtime import offline_defaults
from llm_safepref.core.cli import ToolParser


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def build_parser() -> ToolParser:
    from llm_safepref.eval import RECIPE_MAX_LENGTH

    parser = ToolParser(prog="python -m llm_safepref.eval", description="Safety evaluation of a model on the offline benchmark.")
    parser.add_argument("--model", default="embedded", help="'embedded', a local folder or a Hub id")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder or Hub id applied on top of --model")
    parser.add_argument("--benchmark", default="embedded", help="'embedded' (the built benchmark) or a build folder")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="fixed stratified subset of this many prompts")
    parser.add_argument("--limit_per_category", type=int, default=None,
                        help="at most this many prompts of each category (harmful, benign, look_dangerous, "
                             "contrast_harmful)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--preference_pairs", type=int, default=0, help="also score this many held-out pairs")
    parser.add_argument("--reference", default=None, help="reference model for implicit-reward preference accuracy")
    parser.add_argument("--max_length", type=int, default=RECIPE_MAX_LENGTH,
                        help="preference pairs: truncate prompt+response to this many tokens, as the trainer does "
                             "(the recipes' max_length)")
    parser.add_argument("--conversational", type=_bool, default=True, metavar="{true,false}",
                        help="preference pairs: tokenise as chat messages (the chat template), as the recipes train")
    parser.add_argument("--judge", default="packaged",
                        help="'packaged' (the MiniLM-probe judge), a Hugging Face sequence-classification model (local "
                             "folder or Hub id), or a Python callable module:function / path/file.py:function taking "
                             "(prompts, responses) and returning harmful flags (optionally refusal flags); plug-ins "
                             "without refusal flags use the packaged judge's refusal verdicts")
    parser.add_argument("--judge_harmful_label", default=None,
                        help="with --judge MODEL: the label (name or index) of the harmful class; if unset, the first "
                             "of 'harmful', 'unsafe', 'LABEL_1' among the model's labels")
    parser.add_argument("--judge_weights", default=None,
                        help="packaged judge weights file, e.g. one written by `python -m llm_safepref.judge train` "
                             "(also the refusal judge of plug-ins); if unset, the packaged weights")
    parser.add_argument("--judge_audit", default=None,
                        help="audit file of the judge's sensitivity/specificity (e.g. results/judge_audit.json): adds "
                             "judge-corrected rates (<rate>_corrected, _corrected_ci); if unset, no correction")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; if unset, torch's choice")
    parser.add_argument("--out", default=None, help="write JSON here (+ a .md table next to it)")
    parser.add_argument("--save_generations", action="store_true", help="also write <out>.generations.jsonl")
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from llm_safepref.core.provenance import run_record
    from llm_safepref.eval import evaluate, results_markdown, write_results
    from llm_safepref.eval.correction import AuditError
    from llm_safepref.eval.intervals import OPTIONAL_RATES
    from llm_safepref.judge import resolve_judge
    from llm_safepref.judge.plugins import JudgeSpecError

    try:
        judge = resolve_judge(args.judge, weights=args.judge_weights, harmful_label=args.judge_harmful_label)
    except (JudgeSpecError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.model, adapter=args.adapter, split=args.split, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, limit=args.limit, limit_per_category=args.limit_per_category,
                          seed=args.seed, do_sample=args.do_sample, temperature=args.temperature,
                          benchmark=args.benchmark, preference_pairs=args.preference_pairs, reference=args.reference,
                          keep_generations=args.save_generations, max_length=args.max_length,
                          conversational=args.conversational, judge=judge, judge_audit=args.judge_audit)
    except AuditError as err:  # checked before any generation
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = None if argv is None else "python -m llm_safepref.eval " + shlex.join(argv)
    if args.out:
        write_results(result, args.out, command=command)
    print(results_markdown({**result, **run_record(command)}))
    keys = [k for name in ("harmful_compliance_rate", "over_refusal_rate", "benign_refusal_rate",
                           "look_dangerous_refusal_rate", "instruction_following_rate",
                           "contrast_harmful_compliance_rate")
            for k in (name, f"{name}_ci", f"{name}_corrected", f"{name}_corrected_ci")
            if k in result and not (name in OPTIONAL_RATES and result[name] is None)]
    print(json.dumps({k: result[k] for k in [*keys, "interval", "n_prompts", "n_by_category", "judge_version"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
