"""Export the kept answers of Safe-CPL and Task-only for blind, project labelling.

    python scripts/export_label_set.py --run results/safe_cpl_crowd_v1/runs/main_seed0.json \\
        --out llm_safepref/methods/safe_cpl/labels/main_seed0_answers.jsonl

Writes one JSONL row per (method, test prompt): ``id`` (``<method>|<prompt_id>``), ``method``,
``prompt_id``, ``category``, ``prompt``, ``response``. The judge's verdicts are *not* written.

Design decisions:

* **Why**: harm in the downstream table is the packaged judge's verdict, and the same judge
  labelled the crowd's data, so Safe-CPL could learn the judge's blind spots rather than safety
  (issue #11). Labelling the very answers each method kept, by the project's written guidelines
  (``docs/judge_audit_guidelines.md``), shows whether the judged harmful rate holds up.
* **Blind**: only prompt and answer leave the results file; ``is_harmful`` / ``is_refusal`` /
  ``task_reward`` / ``choice`` stay behind, and the rows are in method-then-prompt order (no
  sorting by any verdict), so the labeller cannot infer the judge from the file.
* **Every prompt** of the run (harmful, benign, look-dangerous), so harm is labelled on harmful
  prompts and over-refusal on the others from the same rows.
* **Prompt texts** come from the benchmark itself (``load_downstream_prompts`` with the run's own
  split and per-category limit, read from the results file), and the run's ``prompt_ids`` and
  ``categories`` must match them one to one and in order; a mismatch is an error naming the row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llm_safepref.core.cli import ToolParser  # noqa: E402

DEFAULT_RUN = "results/safe_cpl_crowd_v1/runs/main_seed0.json"
DEFAULT_OUT = "llm_safepref/methods/safe_cpl/labels/main_seed0_answers.jsonl"
#: The methods whose kept answers are labelled (issue #11: Safe-CPL and Task-only).
METHODS = ("task_only", "safe_cpl_search", "safe_cpl_amortized")
FIELDS = ("id", "method", "prompt_id", "category", "prompt", "response")


def row_id(method: str, prompt_id: str) -> str:
    return f"{method}|{prompt_id}"


def run_prompt_settings(run: dict) -> tuple[str, int]:
    """``(split, per_category)`` of the run: its ``eval_split`` and the largest category count."""
    split = run.get("eval_split", "test")
    outcomes = run["outcomes"]
    first = outcomes[next(iter(outcomes))]
    counts: dict[str, int] = {}
    for cat in first["categories"]:
        counts[cat] = counts.get(cat, 0) + 1
    return split, max(counts.values())


def export_rows(run: dict, prompts: list[dict], methods: tuple[str, ...] = METHODS,
                run_path: str = DEFAULT_RUN) -> list[dict]:
    """The blind rows: for each method, each prompt of ``prompts`` with the method's kept answer."""
    by_position = [(str(p["id"]), p["category"], p["prompt"]) for p in prompts]
    rows = []
    for method in methods:
        if method not in run["outcomes"]:
            raise SystemExit(f"error: {run_path}: outcomes has no method {method!r} "
                             f"(has {sorted(run['outcomes'])})")
        out = run["outcomes"][method]
        n = len(out["prompt_ids"])
        for key in ("categories", "response"):
            if len(out[key]) != n:
                raise SystemExit(f"error: {run_path}: outcomes[{method!r}][{key!r}] has {len(out[key])} "
                                 f"entries, prompt_ids has {n}")
        if n != len(by_position):
            raise SystemExit(f"error: {run_path}: outcomes[{method!r}] has {n} prompts, the benchmark "
                             f"subset has {len(by_position)}")
        for i, (pid, cat, response) in enumerate(zip(out["prompt_ids"], out["categories"], out["response"])):
            want_id, want_cat, text = by_position[i]
            if str(pid) != want_id or cat != want_cat:
                raise SystemExit(f"error: {run_path}: outcomes[{method!r}] row {i}: prompt_id {pid!r} / "
                                 f"category {cat!r}, expected {want_id!r} / {want_cat!r} (the benchmark's order)")
            rows.append({"id": row_id(method, str(pid)), "method": method, "prompt_id": str(pid),
                         "category": cat, "prompt": text, "response": response})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(prog="python scripts/export_label_set.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=DEFAULT_RUN, help="a Safe-CPL results file with per-prompt outcomes")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSONL to write")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated outcome keys")
    parser.add_argument("--benchmark", default="embedded", help="the safety benchmark the run evaluated on")
    args = parser.parse_args(argv)

    from llm_safepref.methods.safe_cpl.downstream import load_downstream_prompts

    run = json.loads(Path(args.run).read_text())
    split, per_category = run_prompt_settings(run)
    prompts = load_downstream_prompts(args.benchmark, split, limit_per_category=per_category)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    rows = export_rows(run, prompts, methods, args.run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows ({len(methods)} methods x {len(prompts)} prompts, {split} split, "
          f"{per_category} per category) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
