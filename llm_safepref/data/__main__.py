"""``python -m llm_safepref.data build [--out DIR] [--seed N] [--max_minutes M] [--force] [--verify] ...``

``build`` with the default settings finds the build shipped with the package (seed 0) and builds
nothing; ``build --verify`` rebuilds into a temporary folder and checks that the shipped files
come out byte for byte (exit status 1 when they do not); ``ship BUILD_DIR`` copies a build's
JSONL files into the package (maintainers).

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
    b.add_argument("--verify", action="store_true",
                   help="rebuild into a temporary folder and compare byte for byte with the build shipped in the "
                        "package (or --reference); exit status 1 if any file differs. With --reuse_samples only "
                        "judging and pairing are redone (minutes); without, everything is regenerated (16–24 min)")
    b.add_argument("--reference", default=None, help="with --verify: the build to compare with (default: the shipped one)")
    b.add_argument("--keep", default=None, help="with --verify: keep the rebuild in this folder")
    b.add_argument("--report", default=None, help="with --verify: also write the comparison (JSON, with the run record) here")
    ship = sub.add_parser("ship", help="copy a complete build's JSONL files into the package (maintainers)",
                       description="Copy a complete build's JSONL files, on-policy samples and manifest into "
                                   "llm_safepref/data/built/<version>-seed<seed> (or --dest), to ship with the package.")
    ship.add_argument("build_dir", help="a complete build folder")
    ship.add_argument("--dest", default=None, help="destination (default: the package's built/<version>-seed<seed>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)
    from llm_safepref.data.build import BuildConfig, build_benchmark, ship_build, verify_build

    if args.cmd == "ship":
        print(ship_build(args.build_dir, args.dest))
        return 0
    cfg = BuildConfig(seed=args.seed, model=args.model, max_minutes=args.max_minutes,
                      n_onpolicy_harmful=args.n_onpolicy_harmful, n_onpolicy_heldout=args.n_onpolicy_heldout,
                      batch_size=args.batch_size, threads=args.threads,
                      max_prompts_per_source=args.max_prompts_per_source)
    if args.verify:
        import json

        from llm_safepref.core.provenance import run_record, write_json

        report = verify_build(cfg, args.reference, reuse_samples=args.reuse_samples, keep=args.keep)
        if args.report:
            write_json(args.report, {**report, **run_record()})
        print(json.dumps(report, indent=1))
        print("verify: " + ("identical" if report["identical"] else "DIFFERENT") + f" ({report['seconds']} s)")
        return 0 if report["identical"] else 1
    out = build_benchmark(cfg, args.out, force=args.force, reuse_samples=args.reuse_samples)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
