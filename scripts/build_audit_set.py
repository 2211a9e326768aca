"""Build the judge audit set: the embedded model's own answers on *validation* prompts, for blind labelling.

    python scripts/build_audit_set.py --out llm_safepref/eval/audit/judge_audit_v1.jsonl \\
        --models base,presa=outputs/audit_adapters/presa_lora --per_category 30 --sampled 40 --threads 1 --seed 0

Writes the JSONL (one answer a line: ``id, prompt_id, category, model, decoding, prompt, response``)
and a manifest next to it (``<out stem>.manifest.json``: the run record, the generation settings,
the prompts used, the adapters' provenance, the generation time). Labels and judge verdicts are
*not* written here: labelling is blind (``docs/judge_audit_guidelines.md``), and the judge is run
afterwards by ``python -m llm_safepref.eval.audit``.

Design decisions:

* **Validation prompts only** (``load_eval_prompts(benchmark, "validation")``): the audit measures
  the judge that scores the test split, so no test prompt may enter it (a test checks).
* **Decoded as the evaluation decodes**: the answers come from the evaluation's own loader
  (``llm_safepref.eval._load_policy``: the model, plus a PEFT adapter) and generator
  (``llm_safepref.data.sampling.generate_responses``: chat template, no system prompt, left
  padding, greedy, 64 new tokens), at the recipes' evaluation batch size (8) by default.
* **Which prompts**: for each greedy model, at most ``--per_category`` prompts of each category,
  picked by the evaluation's own fixed ranking (``stratified_subset(per_category=...)``, smallest
  ``sha256(id)`` first), so base and trained answer the same prompts and can be compared.
* **More harmful-looking answers**: ``--sampled N`` base answers at temperature 0.8 (top-p 0.95,
  seeded per batch as the build samples) on harmful and contrast-harmful prompts *not* in the
  greedy selection (the next ones in the same ranking, half from each category), because the
  greedy answers alone give few harmful positives to measure sensitivity on.
* ``id`` = ``<model>-<decoding>-<prompt_id>``: unique, stable across rebuilds, and it says what the
  row is without revealing any verdict.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llm_safepref.core.cli import ToolParser  # noqa: E402

DEFAULT_OUT = "llm_safepref/eval/audit/judge_audit_v1.jsonl"
DEFAULT_MODELS = "base,presa=outputs/audit_adapters/presa_lora"
FIELDS = ("id", "prompt_id", "category", "model", "decoding", "prompt", "response")
#: Categories of the sampled rows (c): where a harmful answer is possible.
SAMPLED_CATEGORIES = ("harmful", "contrast_harmful")


def parse_models(spec: str) -> list[tuple[str, str | None]]:
    """``"base,presa=PATH"`` -> ``[("base", None), ("presa", "PATH")]``; a name without ``=`` is the bare model."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, adapter = part.partition("=")
        if not name.isidentifier():
            raise SystemExit(f"error: --models: model name {name!r} must be a word (letters, digits, _)")
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise SystemExit(f"error: --models: {name}={adapter}: no PEFT adapter there (adapter_config.json missing)")
        out.append((name, adapter or None))
    if not out:
        raise SystemExit("error: --models names no model")
    if len({n for n, _ in out}) != len(out):
        raise SystemExit(f"error: --models: repeated model name in {spec!r}")
    return out


def adapter_provenance(adapter: str) -> dict:
    """Where a trained adapter came from: its ``run_metrics.json`` command, date, revision; weights sha256."""
    folder = Path(adapter)
    record: dict = {"path": str(adapter)}
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        record["adapter_model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    metrics = folder / "run_metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        record.update({f"training_{k}": m.get(k) for k in ("command", "date", "git_revision", "machine")})
        record.update({"method": m.get("method"), "global_step": m.get("global_step"),
                       "final_train_loss": m.get("final_train_loss")})
        lag = folder / "lagrange.json"
        if lag.is_file():
            record["lagrange"] = json.loads(lag.read_text())
    else:
        record["training_run"] = "unknown: the adapter folder has no run_metrics.json"
    return record


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(description=__doc__.split("\n\n")[0], prog="python scripts/build_audit_set.py")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSONL to write (a .manifest.json is written beside it)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated NAME or NAME=ADAPTER_DIR; each answers greedily")
    p.add_argument("--base_model", default="embedded", help="the model (and the adapters' base)")
    p.add_argument("--benchmark", default="embedded", help="benchmark whose validation prompts are used")
    p.add_argument("--per_category", type=int, default=30, help="greedy prompts per category and model")
    p.add_argument("--sampled", type=int, default=40,
                   help="extra base answers sampled at --temperature on unused harmful / contrast prompts")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled rows")
    p.add_argument("--max_new_tokens", type=int, default=64, help="as the evaluation")
    p.add_argument("--batch_size", type=int, default=8, help="generation batch size (the recipes' evaluation: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled rows")
    args = p.parse_args(argv)
    if args.per_category <= 0 or args.sampled < 0:
        p.error("--per_category must be positive and --sampled non-negative")

    import torch

    from llm_safepref.core.provenance import run_record, write_json
    from llm_safepref.data.adapters import load_eval_prompts
    from llm_safepref.data.sampling import generate_responses
    from llm_safepref.eval import _load_policy, _ranked, stratified_subset

    torch.set_num_threads(args.threads)
    models = parse_models(args.models)
    prompts = [dict(r) for r in load_eval_prompts(args.benchmark, "validation")]
    chosen = stratified_subset(prompts, None, per_category=args.per_category)
    chosen_ids = {r["id"] for r in chosen}
    rest = {c: [r for r in _ranked([r for r in prompts if r["category"] == c]) if r["id"] not in chosen_ids]
            for c in SAMPLED_CATEGORIES}
    half = args.sampled // len(SAMPLED_CATEGORIES)
    quota = {c: half + (1 if i < args.sampled - half * len(SAMPLED_CATEGORIES) else 0)
             for i, c in enumerate(SAMPLED_CATEGORIES)}
    sampled = [r for c in SAMPLED_CATEGORIES for r in rest[c][: quota[c]]]

    rows, timing = [], {}
    jobs = [(name, adapter, "greedy", chosen) for name, adapter in models]
    if sampled:
        jobs.append(("base", None, f"sampled_t{args.temperature:g}", sampled))
    for name, adapter, decoding, batch in jobs:
        t0 = time.time()
        model, tok = _load_policy(args.base_model, adapter)
        do_sample = decoding != "greedy"
        answers = generate_responses(model, tok, [r["prompt"] for r in batch], max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, do_sample=do_sample, temperature=args.temperature,
                                     seed=args.seed, desc=f"{name}/{decoding}")
        timing[f"{name}-{decoding}"] = {"answers": len(batch), "seconds": round(time.time() - t0, 1)}
        for r, a in zip(batch, answers):
            rows.append({"id": f"{name}-{decoding}-{r['id']}", "prompt_id": r["id"], "category": r["category"],
                         "model": name, "decoding": decoding, "prompt": r["prompt"], "response": a})
        del model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
    total = round(sum(t["seconds"] for t in timing.values()), 1)
    by = {}
    for row in rows:
        key = f"{row['model']}-{row['decoding']}"
        by.setdefault(key, {}).setdefault(row["category"], 0)
        by[key][row["category"]] += 1
    manifest = {
        "audit_set": out.name, "n_rows": len(rows), "rows_by_model_and_category": by,
        "split": "validation", "benchmark": args.benchmark,
        "benchmark_folder": _benchmark_folder(args.benchmark),
        "base_model": args.base_model,
        "models": {name: (adapter_provenance(adapter) if adapter else {"adapter": None}) for name, adapter in models},
        "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "system_prompt": None,
                       "greedy": True, "sampled": {"n": len(sampled), "temperature": args.temperature,
                                                   "top_p": 0.95, "seed": args.seed, "model": "base",
                                                   "categories": list(SAMPLED_CATEGORIES)},
                       "per_category": args.per_category, "selection": "stratified_subset(per_category) of the "
                       "evaluation (smallest sha256(id) first); sampled rows: the next prompts in that ranking"},
        "torch_threads": torch.get_num_threads(),
        "generation_seconds": timing, "generation_seconds_total": total,
        **run_record(),
    }
    write_json(out.with_suffix(".manifest.json"), manifest)
    print(f"wrote {len(rows)} answers to {out} ({total} s of generation, {torch.get_num_threads()} torch thread(s))")
    for k, v in timing.items():
        print(f"  {k}: {v['answers']} answers, {v['seconds']} s")
    return 0


def _benchmark_folder(benchmark: str) -> str | None:
    if benchmark != "embedded":
        return str(benchmark)
    try:
        from llm_safepref.data.build import benchmark_folder

        folder = Path(benchmark_folder())
        return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)
    except Exception as err:  # the manifest still records that it is unknown
        return f"unknown ({err})"


if __name__ == "__main__":
    raise SystemExit(main())
