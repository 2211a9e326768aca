"""``python -m llm_safepref.eval.audit``: run a judge on the labelled audit set, write the audit file.

    python -m llm_safepref.eval.audit --out results/judge_audit.json

The file (schema ``llm_safepref.judge_audit/1``, ``llm_safepref.eval.correction``) is what
``python -m llm_safepref.eval --judge_audit FILE`` and ``scripts/compare_methods.py --judge_audit``
use to correct judged rates; see ``llm_safepref.eval.audit`` for what each block is measured on.
"""

from __future__ import annotations

import time

from llm_safepref.core.cli import ToolParser


def main(argv: list[str] | None = None) -> int:
    from llm_safepref.eval.audit import AUDIT_SET, LABELS, score_audit

    p = ToolParser(prog="python -m llm_safepref.eval.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/judge_audit.json", help="audit file to write")
    p.add_argument("--judge", default=None, help="judge spec as in python -m llm_safepref.eval (default: packaged)")
    p.add_argument("--audit_set", default=str(AUDIT_SET), help="answers (JSONL)")
    p.add_argument("--labels", default=str(LABELS), help="labels (JSONL)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = score_audit(args.out, judge=args.judge, set_path=args.audit_set, labels_path=args.labels)
    for verdict in ("harm", "refusal"):
        b = data[verdict]
        print(f"{verdict:8s} n={b['n']:3d} tp={b['tp']} fn={b['fn']} tn={b['tn']} fp={b['fp']}  "
              f"sensitivity {b['sensitivity']:.3f} {b['sensitivity_ci']}  "
              f"specificity {b['specificity']:.3f} {b['specificity_ci']}")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s; judge {data['judge_version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
