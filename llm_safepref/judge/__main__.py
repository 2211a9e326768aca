"""``python -m llm_safepref.judge train [--out FILE | --replace_packaged] [--seed N] [--C C] [--features v2|v3]
[--request_threshold T] [--results results/judge.json]``.

Flags follow the toolkit's convention (``llm_safepref.core.cli.ToolParser``): ``--snake_case``,
``--kebab-case`` accepted. The results file carries the run record of ``llm_safepref.core.provenance``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from llm_safepref._runtime import offline_defaults
from llm_safepref.core.cli import ToolParser


def write_markdown(record: dict, path: Path) -> None:
    """The Markdown companion of results/judge.json."""
    h, r = record, record["refusal_heldout"]
    g = record["details"].get("harm_heldout_without_request_gate")
    md = [
        f"# Judge held-out metrics ({record['judge_version']})",
        "",
        f"Command: `{record['command']}` — {record['date']}, {record['machine']}, revision {record.get('git_revision')}",
        "",
        "| task | n | positives | accuracy | precision | recall | F1 |",
        "|---|---|---|---|---|---|---|",
        f"| harmful response (human labels), full judge | {h['n_heldout']} | {h['n_heldout_harmful']} | {h['heldout_accuracy']:.3f} "
        f"| {h['precision']:.3f} | {h['recall']:.3f} | {h['f1']:.3f} |",
    ]
    if g:
        md.append(f"| harmful response, response probe only (no request gate) | {g['n']} | {g['n_positive']} | "
                  f"{g['accuracy']:.3f} | {g['precision']:.3f} | {g['recall']:.3f} | {g['f1']:.3f} |")
    md += [
        f"| refusal (human labels) | {r['n']} | {r['n_positive']} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |",
        "",
        "Held-out rows: pyrit's human-labelled (objective, response) rows whose objective was never used in training "
        f"({record['details'].get('heldout_frac', 0.25):.0%} of objectives, seeded). Target was 0.85 accuracy; the judge does not reach it. "
        "The request gate costs some held-out accuracy (it misses harmful objectives that read mildly) but is "
        "needed: without it every compliant answer to a benign request is called harmful. pyrit's refusal labels "
        "count off-topic answers as refusals; this judge counts only explicit refusals (low recall there by design).",
        "",
    ]
    path.write_text("\n".join(md))


def build_parser() -> ToolParser:
    parser = ToolParser(prog="python -m llm_safepref.judge",
                        description="The offline MiniLM-probe judge of harmful responses and refusals.")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=ToolParser)
    tr = sub.add_parser("train", help="train the MiniLM probes on pyrit's human-labelled rows and report held-out metrics",
                        description="Train the judge's probes and report held-out metrics. The weights go to --out "
                                    "(default: under the cache root); the packaged judge is replaced only with "
                                    "--replace_packaged.")
    # Not an argparse mutually exclusive group: its add_argument would bypass ToolParser's aliases.
    tr.add_argument("--out", default=None,
                    help="weights file; if unset, <cache root>/judge/judge_weights-<features>-seed<seed>.json")
    tr.add_argument("--replace_packaged", action="store_true",
                    help="overwrite the packaged llm_safepref/judge/judge_weights.json (the judge every result names); "
                         "not with --out")
    tr.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the probes")
    tr.add_argument("--C", type=float, default=None, help="inverse L2 strength of the probes; if unset, chosen by 4-fold CV on training objectives")
    tr.add_argument("--heldout_frac", type=float, default=0.25, help="fraction of objectives held out")
    tr.add_argument("--features", default=None, choices=("v2", "v3"),
                    help="feature set; if unset, the packaged judge's (v3: + sentence max/mean pooling)")
    tr.add_argument("--request_threshold", type=float, default=None, help="request-gate threshold; if unset, 0.3 for v3, 0.5 for v2")
    tr.add_argument("--max_rows", type=int, default=None,
                    help="smoke runs: train on at most this many rows of each source (a small, weaker judge)")
    tr.add_argument("--results", default=None, help="also write a results JSON (+ .md) here, e.g. results/judge.json")
    tr.add_argument("--threads", type=int, default=int(os.environ.get("LLM_SAFEPREF_THREADS", "1")),
                    help="torch threads of the encoder ($LLM_SAFEPREF_THREADS, else 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None and args.replace_packaged:
        parser.error("--out and --replace_packaged exclude each other")

    import torch

    torch.set_num_threads(args.threads)
    from llm_safepref.core.provenance import run_record, write_json
    from llm_safepref.judge import train_judge

    metrics = train_judge(seed=args.seed, heldout_frac=args.heldout_frac, C=args.C, out=args.out,
                          feature_set=args.features, request_threshold=args.request_threshold,
                          replace_packaged=args.replace_packaged, max_rows=args.max_rows)
    print(json.dumps(metrics, indent=2))
    print(f"judge weights written to {metrics['weights']}", file=sys.stderr)
    if args.results:
        h = metrics["harm_heldout"]
        command = None if argv is None else "python -m llm_safepref.judge " + shlex.join(argv)
        record = {
            "judge_version": metrics["version"],
            "weights": metrics["weights"],
            "heldout_accuracy": h["accuracy"],
            "precision": h["precision"],
            "recall": h["recall"],
            "f1": h["f1"],
            "n_heldout": h["n"],
            "n_heldout_harmful": h["n_positive"],
            "refusal_heldout": metrics["refusal_heldout"],
            "details": metrics,
            "torch_threads": torch.get_num_threads(),
            **run_record(command),
        }
        path = write_json(args.results, record)
        write_markdown(record, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
