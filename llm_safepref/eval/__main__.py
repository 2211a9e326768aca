"""``python -m llm_safepref.eval [--model embedded] [--adapter DIR] [--split test] [--limit N] [--out FILE]``"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m llm_safepref.eval", description="Safety evaluation of a model")
    parser.add_argument("--model", default="embedded", help="'embedded', a local folder or a Hub id")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder or Hub id applied on top of --model")
    parser.add_argument("--benchmark", default="embedded", help="'embedded' (the built benchmark) or a build folder")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="fixed stratified subset of this many prompts")
    parser.add_argument("--limit-per-category", type=int, default=None,
                        help="at most this many prompts of each category (harmful, benign, look_dangerous)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--preference-pairs", type=int, default=0, help="also score this many held-out pairs")
    parser.add_argument("--reference", default=None, help="reference model for implicit-reward preference accuracy")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write JSON here (+ a .md table next to it)")
    parser.add_argument("--save-generations", action="store_true", help="also write <out>.generations.jsonl")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from llm_safepref.eval import evaluate, results_markdown, write_results

    result = evaluate(args.model, adapter=args.adapter, split=args.split, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, limit=args.limit, limit_per_category=args.limit_per_category, seed=args.seed, do_sample=args.do_sample,
                      temperature=args.temperature, benchmark=args.benchmark, preference_pairs=args.preference_pairs,
                      reference=args.reference, keep_generations=args.save_generations)
    result["command"] = "python -m llm_safepref.eval " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.out:
        write_results(result, args.out)
    print(results_markdown(result))
    print(json.dumps({k: result[k] for k in ("harmful_compliance_rate", "over_refusal_rate",
                                              "instruction_following_rate", "n_prompts", "judge_version")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
