"""``python -m llm_safepref.data build [--out DIR] [--seed N] [--max-minutes M] [--force] ...``"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llm_safepref.data.build import BuildConfig, build_benchmark

    parser = argparse.ArgumentParser(prog="python -m llm_safepref.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the offline safety benchmark")
    b.add_argument("--out", default=None, help="output folder (default: cache_dir()/benchmark/<version>-seed<seed>)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-minutes", type=float, default=BuildConfig.max_minutes, help="wall-clock guard of the build")
    b.add_argument("--n-onpolicy-harmful", type=int, default=BuildConfig.n_onpolicy_harmful)
    b.add_argument("--n-onpolicy-heldout", type=int, default=BuildConfig.n_onpolicy_heldout,
                   help="harmful validation / test prompts (each) that get on-policy samples")
    b.add_argument("--model", default="embedded", help="policy to sample on-policy responses from")
    b.add_argument("--batch-size", type=int, default=BuildConfig.batch_size)
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    b.add_argument("--max-prompts-per-source", type=int, default=None, help="subsample sources (quick builds)")
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    b.add_argument("--reuse-samples", default=None,
                   help="onpolicy_responses.jsonl of an earlier build: reuse its generations (same sampling settings)")
    args = parser.parse_args(argv)
    cfg = BuildConfig(seed=args.seed, model=args.model, max_minutes=args.max_minutes,
                      n_onpolicy_harmful=args.n_onpolicy_harmful, n_onpolicy_heldout=args.n_onpolicy_heldout, batch_size=args.batch_size, threads=args.threads,
                      max_prompts_per_source=args.max_prompts_per_source)
    out = build_benchmark(cfg, args.out, force=args.force, reuse_samples=args.reuse_samples)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
