"""``python -m llm_safepref.crowd build [--out DIR] [--seed N] [--samples_per_prompt K] [--max_new_tokens T]
[--limit N] [--imbalance GROUP:RATIO] [--safety_rule R] ...``, ``python -m llm_safepref.crowd relabel --from DIR
[--safety_rule R] ...`` and ``python -m llm_safepref.crowd users``."""

from __future__ import annotations

import sys

from llm_safepref._runtime import offline_defaults
from llm_safepref.core.cli import ToolParser


def _none_or_int(value: str):
    return None if value.lower() in ("none", "all") else int(value)


def _parser() -> ToolParser:
    from llm_safepref.crowd.build import SAFETY_RULES, CrowdConfig

    d = CrowdConfig()
    parser = ToolParser(prog="python -m llm_safepref.crowd",
                        description="The offline crowd preference benchmark (Safe-CPL): simulated users, one safety standard.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the crowd benchmark (needs the built safety benchmark)")
    b.add_argument("--out", default=None, help="output folder; none given: cache_root()/crowd/<version>-seed<seed>")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--benchmark", default=None, help="built safety benchmark folder; none given: benchmark_dir(0)")
    b.add_argument("--model", default=d.model, help="policy whose samples are annotated")
    b.add_argument("--samples_per_prompt", type=int, default=d.samples_per_prompt, help="on-policy samples per prompt (K)")
    b.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="tokens per sample")
    b.add_argument("--limit", type=int, default=None, help="cap every (split, category) at N prompts (small builds)")
    b.add_argument("--n_harmful", type=_none_or_int, nargs=3, default=list(d.n_harmful), metavar=("TRAIN", "VAL", "TEST"),
                   help="harmful prompts per split ('all' for every one)")
    b.add_argument("--n_benign", type=_none_or_int, nargs=3, default=list(d.n_benign), metavar=("TRAIN", "VAL", "TEST"))
    b.add_argument("--n_look_dangerous", type=_none_or_int, nargs=3, default=list(d.n_look_dangerous),
                   metavar=("TRAIN", "VAL", "TEST"))
    b.add_argument("--imbalance", default=d.imbalance,
                   help="GROUP:RATIO of the imbalanced train file (group = a crowd goal kind); 'none' for no such file")
    b.add_argument("--margin", type=float, default=d.margin, help="least score difference that makes a preference")
    b.add_argument("--max_pairs_per_prompt", type=int, default=d.max_pairs_per_prompt, help="pairs per user and prompt")
    b.add_argument("--no_diversify", action="store_true", help="no style instructions: K plain samples per prompt")
    b.add_argument("--no_written_refusal", action="store_true", help="no written refusal among the candidates")
    b.add_argument("--batch_size", type=int, default=d.batch_size)
    b.add_argument("--threads", type=int, default=d.threads, help="torch threads (default 1: the CPU is shared)")
    b.add_argument("--max_minutes", type=float, default=d.max_minutes, help="wall-clock guard of the sampling")
    b.add_argument("--safety_rule", default=d.safety_rule, choices=sorted(SAFETY_RULES),
                   help="how is_safe follows from the judge: " + "; ".join(f"{k}: {v}" for k, v in SAFETY_RULES.items()))
    b.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    r = sub.add_parser("relabel", help="a new build from a complete build's samples and judge verdicts, with another "
                                       "safety rule (no generation, no judging: seconds)")
    r.add_argument("--from", dest="source", required=True, help="a complete crowd build folder")
    r.add_argument("--out", default=None, help="output folder; none given: cache_root()/crowd/<version>-seed<seed>")
    r.add_argument("--safety_rule", default=d.safety_rule, choices=sorted(SAFETY_RULES))
    r.add_argument("--margin", type=float, default=None, help="default: the source's")
    r.add_argument("--max_pairs_per_prompt", type=int, default=None, help="default: the source's")
    r.add_argument("--imbalance", default=None, help="GROUP:RATIO or 'none'; default: the source's")
    r.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    sub.add_parser("users", help="print the crowd, the held-out users and the downstream goal")
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = _parser().parse_args(argv)
    if args.cmd == "users":
        from llm_safepref.core.tables import markdown_table
        from llm_safepref.crowd.users import all_users

        print(markdown_table(["user", "role", "group", "goal"],
                             [[u.user_id, u.role, u.group, u.goal.describe()] for u in all_users()]))
        return 0
    from llm_safepref.crowd.build import CrowdConfig, build_crowd, relabel_crowd

    command = "python -m llm_safepref.crowd " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.cmd == "relabel":
        imb = ... if args.imbalance is None else (None if args.imbalance.lower() in ("none", "") else args.imbalance)
        print(relabel_crowd(args.source, args.out, safety_rule=args.safety_rule, margin=args.margin,
                            max_pairs_per_prompt=args.max_pairs_per_prompt, imbalance=imb, force=args.force,
                            command=command))
        return 0
    imbalance = None if str(args.imbalance).lower() in ("none", "") else args.imbalance
    cfg = CrowdConfig(seed=args.seed, model=args.model, benchmark=args.benchmark,
                      samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      n_harmful=tuple(args.n_harmful), n_benign=tuple(args.n_benign),
                      n_look_dangerous=tuple(args.n_look_dangerous), imbalance=imbalance, margin=args.margin,
                      max_pairs_per_prompt=args.max_pairs_per_prompt, diversify=not args.no_diversify,
                      add_written_refusal=not args.no_written_refusal, batch_size=args.batch_size, threads=args.threads,
                      max_minutes=args.max_minutes, safety_rule=args.safety_rule)
    print(build_crowd(cfg, args.out, force=args.force, command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
