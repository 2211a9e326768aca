"""``python -m llm_safepref.data build [--out DIR] [--seed N] [--max_minutes M] [--force] ...``

Flags follow the toolkit's convention (``llm_safepref.core.cli.ToolParser``): ``--snake_case``,
``--kebab-case`` accepted (``--max-minutes`` and ``--max_minutes`` both work).
"""

from __future__ import annotations

import sys

from llm_safepref._runtime import offline_defaults
from llm_safepref.core.cli import ToolParser


def build_parser() -> ToolParser:
    from llm_safepref.data.build import BuildConfig

    parser = ToolParser(prog="python -m llm_safepref.data", description="The offline safety benchmark.")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=ToolParser)
    b = sub.add_parser("build", help="build (or reuse) the offline safety benchmark",
                       description="Build (or reuse) the offline safety benchmark: prompts, splits, on-policy "
                                   "responses, judge labels, pairs. Cached; about 16–24 min on a 2-core CPU.")
    b.add_argument("--out", default=None, help="output folder; if unset, cache_dir()/benchmark/<version>-seed<seed>")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max_minutes", type=float, default=BuildConfig.max_minutes, help="wall-clock guard of the build")
    b.add_argument("--n_onpolicy_harmful", type=int, default=BuildConfig.n_onpolicy_harmful)
    b.add_argument("--n_onpolicy_heldout", type=int, default=BuildConfig.n_onpolicy_heldout,
                   help="harmful validation / test prompts (each) that get on-policy samples")
    b.add_argument("--model", default="embedded", help="policy to sample on-policy responses from")
    b.add_argument("--batch_size", type=int, default=BuildConfig.batch_size)
    b.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    b.add_argument("--max_prompts_per_source", type=int, default=None, help="subsample sources (quick builds)")
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    b.add_argument("--reuse_samples", default=None,
                   help="onpolicy_responses.jsonl of an earlier build: reuse its generations (same sampling settings)")
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)
    from llm_safepref.data.build import BuildConfig, build_benchmark

    cfg = BuildConfig(seed=args.seed, model=args.model, max_minutes=args.max_minutes,
                      n_onpolicy_harmful=args.n_onpolicy_harmful, n_onpolicy_heldout=args.n_onpolicy_heldout,
                      batch_size=args.batch_size, threads=args.threads,
                      max_prompts_per_source=args.max_prompts_per_source)
    out = build_benchmark(cfg, args.out, force=args.force, reuse_samples=args.reuse_samples)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
