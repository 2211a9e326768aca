"""``python -m llm_safepref.judge train [--out FILE] [--seed N] [--C C] [--features v2|v3] [--request-threshold T] [--results results/judge.json]``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path



def write_markdown(record: dict, path: Path) -> None:
    """The Markdown companion of results/judge.json."""
    h, r = record, record["refusal_heldout"]
    g = record["details"].get("harm_heldout_without_request_gate")
    md = [
        f"# Judge held-out metrics ({record['judge_version']})",
        "",
        f"Command: `{record['command']}` — {record['date']}, {record['machine']}",
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
        "(25 % of objectives, seeded). Target was 0.85 accuracy; the judge does not reach it. "
        "The request gate costs some held-out accuracy (it misses harmful objectives that read mildly) but is "
        "needed: without it every compliant answer to a benign request is called harmful. pyrit's refusal labels "
        "count off-topic answers as refusals; this judge counts only explicit refusals (low recall there by design).",
        "",
    ]
    path.write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="python -m llm_safepref.judge", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the MiniLM probes on pyrit's human-labelled rows and report held-out metrics")
    tr.add_argument("--out", default=None, help="weights file (default: the packaged llm_safepref/judge/judge_weights.json)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the probes")
    tr.add_argument("--C", type=float, default=None, help="inverse L2 strength of the probes (default: chosen by 4-fold CV on training objectives)")
    tr.add_argument("--heldout-frac", type=float, default=0.25, help="fraction of objectives held out")
    tr.add_argument("--features", default="v3", choices=("v2", "v3"), help="feature set (v3: + sentence max/mean pooling; v2: the old judge)")
    tr.add_argument("--request-threshold", type=float, default=None, help="request-gate threshold (default 0.3 for v3, 0.5 for v2)")
    tr.add_argument("--results", default=None, help="also write a results JSON (+ .md) here, e.g. results/judge.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("LLM_SAFEPREF_THREADS", "1")))
    from llm_safepref.judge import train_judge

    metrics = train_judge(seed=args.seed, heldout_frac=args.heldout_frac, C=args.C, out=args.out,
                          feature_set=args.features, request_threshold=args.request_threshold)
    print(json.dumps(metrics, indent=2))
    if args.results:
        h = metrics["harm_heldout"]
        record = {
            "judge_version": metrics["version"],
            "heldout_accuracy": h["accuracy"],
            "precision": h["precision"],
            "recall": h["recall"],
            "f1": h["f1"],
            "n_heldout": h["n"],
            "n_heldout_harmful": h["n_positive"],
            "refusal_heldout": metrics["refusal_heldout"],
            "details": metrics,
            "command": "python -m llm_safepref.judge " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "date": datetime.date.today().isoformat(),
            "machine": f"CPU ({os.cpu_count()} cores), {platform.system()} {platform.machine()}, torch threads {torch.get_num_threads()}",
        }
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        write_markdown(record, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
