"""The full Safe-CPL table: every arm x every seed through the recipe, then one aggregated results file.

    python scripts/safe_cpl_table.py --seeds 0 1 2 --out results/safe_cpl_embedded.json
    python scripts/safe_cpl_table.py --seeds 0 1 2 --out results/safe_cpl_embedded.json --aggregate_only

Arms (each one ``accelerate launch recipes/safe_cpl_lora.py`` run per seed, its downstream file
``<runs_dir>/<arm>_seed<s>.json``; a file already there is kept, so a stopped run resumes by
running the same command again):

* ``main``: stage 1 on the crowd, Safe-CPL search + amortised, task-only, oracle, RC(ω),
  pooled DPO, personalisation;
* ``imbalanced``: stage 1 and RC's reward model on the imbalanced crowd file (the length group
  8x larger): ``rc_<ω>_imbalanced``, ``safe_cpl_search_imbalanced``, ``safe_cpl_amortized_imbalanced``;
* ``presa``: stage 1 with PRESA's safety-label term (``--safety_term true``): ``safe_cpl_presa``
  (stage 2 by search).

Aggregation: every method's per-seed per-prompt outcomes go to
``llm_safepref.methods.safe_cpl.downstream.method_metrics`` (two-level intervals over seeds, then
prompts, ``<metric>_std`` over seeds), normalised by task-only and oracle (the base model's K
samples: the same for every seed, ``n_seeds`` 1). Writes the ``--out`` JSON (the issue's schema),
its ``.md`` table, and a PNG of RC's ω sweep against Safe-CPL in the reward-cost plane, with and
without imbalance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llm_safepref.core.cli import ToolParser  # noqa: E402

ARMS = {
    "main": ["--baselines", "task_only", "oracle", "rc", "dpo_pooled", "--personalization", "true"],
    "imbalanced": ["--crowd_imbalanced", "true", "--baselines", "task_only", "oracle", "rc"],
    "presa": ["--safety_term", "true", "--stage2_methods", "search", "--baselines", "task_only", "oracle"],
}


def rename(arm: str, method: str) -> str | None:
    """The results-file name of ``method`` of ``arm`` (None: not reported from this arm)."""
    if arm == "main":
        return method
    if method in ("task_only", "oracle"):
        return None  # the same base samples as the main arm's
    if arm == "imbalanced":
        return f"{method}_imbalanced"
    return "safe_cpl_presa" if method == "safe_cpl_search" else None


def run_arms(args) -> list[Path]:
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in args.seeds:
        for arm in args.arms:
            out = runs / f"{arm}_seed{seed}.json"
            files.append(out)
            if out.exists():
                print(f"{out}: done, kept", flush=True)
                continue
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                   "--num_cpu_threads_per_process", str(args.threads), str(ROOT / "recipes" / "safe_cpl_lora.py"),
                   "--seed", str(seed), "--output_dir", str(Path(args.outputs_dir) / f"{arm}_seed{seed}"),
                   "--results_file", str(out), *ARMS[arm], *args.recipe_args]
            print("running: " + " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            print(f"{arm} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return files


def aggregate(args) -> dict:
    from llm_safepref.core.provenance import run_record, write_json
    from llm_safepref.core.stats import seed_summary
    from llm_safepref.methods.safe_cpl.downstream import format_table, method_metrics

    runs = Path(args.runs_dir)
    per_method: dict[str, list[dict]] = {}
    records = {}
    for seed in args.seeds:
        for arm in ARMS:  # every arm's finished runs, whichever --arms ran this time
            path = runs / f"{arm}_seed{seed}.json"
            if not path.exists():
                continue
            rec = json.loads(path.read_text())
            records[(arm, seed)] = rec
            for method, outcomes in rec.get("outcomes", {}).items():
                name = rename(arm, method)
                if name is not None:
                    per_method.setdefault(name, []).append(outcomes)
    if ("main", args.seeds[0]) not in records:
        raise SystemExit(f"no main run of seed {args.seeds[0]} in {runs} (it holds the reference methods): run "
                         f"`python scripts/safe_cpl_table.py --seeds {args.seeds[0]} --arms main` first")
    versions = {key: rec.get("dataset_version", "unrecorded") for key, rec in records.items()}
    if len(set(versions.values())) > 1:
        raise SystemExit(f"the runs in {runs} trained on different crowd data ("
                         + ", ".join(f"{arm}_seed{seed}: {v}" for (arm, seed), v in sorted(versions.items()))
                         + "); keep one dataset version per --runs_dir")
    dataset_version = next(iter(versions.values()))
    first = records[("main", args.seeds[0])]["outcomes"]
    oracle, task_only = first["oracle"], first["task_only"]
    methods = {}
    for name, seeds in per_method.items():
        if name in ("task_only", "oracle"):
            seeds = seeds[:1]  # identical across seeds (the cached base samples)
        methods[name] = method_metrics(seeds, oracle=oracle, task_only=task_only)
    personalization = {}
    mains = [records[("main", s)] for s in args.seeds if ("main", s) in records and records[("main", s)].get(
        "personalization")]
    for key in ("inferred", "prior_mean", "dpo_pooled"):
        per_seed = [m["personalization"][key]["scores"] for m in mains if key in m["personalization"]]
        if per_seed:
            summary = seed_summary(per_seed)
            personalization[key] = {"goal_satisfaction": round(summary["mean"], 4),
                                    "goal_satisfaction_ci": [round(x, 4) for x in summary["ci"]],
                                    "goal_satisfaction_std": round(summary["std"], 4), "n_seeds": summary["n_seeds"],
                                    "n_cells": summary["n_prompts"]}
    expected = ["task_only", "oracle", *(f"rc_{w:g}" for w in (0.25, 0.5, 0.75)), "dpo_pooled", "safe_cpl_search",
                "safe_cpl_amortized", "safe_cpl_presa", *(f"rc_{w:g}_imbalanced" for w in (0.25, 0.5, 0.75)),
                "safe_cpl_search_imbalanced", "safe_cpl_amortized_imbalanced"]
    missing = [m for m in expected if m not in methods]
    timings = {f"{arm}_seed{seed}": rec.get("timings_s", {}).get("total_s") for (arm, seed), rec in records.items()}
    decoding = {f"{arm}_seed{seed}": decoding_of(rec) for (arm, seed), rec in sorted(records.items())}
    record = run_record(
        methods=methods, personalization=personalization, seeds=list(args.seeds), missing_methods=missing,
        dataset_version=dataset_version,
        n_prompts=len(first["task_only"]["prompt_ids"]),
        runs={f"{arm}_seed{seed}": str(runs / f"{arm}_seed{seed}.json") for (arm, seed) in records},
        run_commands={f"{arm}_seed{seed}": rec.get("command") for (arm, seed), rec in records.items()},
        timings_s=timings, decoding=decoding,
        goals={"normalized_cost_max": 0.10, "normalized_reward_min": 0.85, "over_refusal_max_over_task_only": 0.10},
        how="methods: llm_safepref.methods.safe_cpl.downstream.method_metrics over the seeds' per-prompt outcomes "
            "(two-level bootstrap: seeds, then prompts); task_only/oracle/the base-sample baselines share one set of "
            "base samples")
    out = Path(args.out)
    write_json(out, record)
    md = [f"# Safe-CPL at token level (embedded model, {dataset_version})\n",
          f"`{record['command']}` ({record['date']}, {record['machine']})\n",
          format_table(methods, markdown=True), ""]
    if personalization:
        md.append("Personalisation (held-out users, goal satisfaction): " + ", ".join(
            f"{k} {v['goal_satisfaction']:.3f} [{v['goal_satisfaction_ci'][0]:.3f}, {v['goal_satisfaction_ci'][1]:.3f}]"
            for k, v in personalization.items()))
    if len({json.dumps(d, sort_keys=True) for d in decoding.values()}) > 1:
        md.append("\nThe runs decoded the trained models' candidates in different ways (the same method and sampling "
                  "settings, another draw): " + "; ".join(
                      f"{name}: batches of {d['candidate_batch_size']}, LoRA {'merged' if d['merged_adapter'] else 'unmerged'}"
                      for name, d in decoding.items()) + ".")
    if missing:
        md.append(f"\nNot run yet (no result file of their arm in {runs}): {', '.join(missing)}.")
    out.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    plot(methods, out.with_suffix(".png"))
    print(format_table(methods))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return record


def decoding_of(rec: dict) -> dict:
    """How a run decoded its trained models' candidates (before 2026-12-06: batches of ``batch_size``, unmerged;
    then ``candidate_batch_size``, merged; e408935 called them ``stage2_batch_size`` / ``stage2_merged_adapter``)."""
    g = rec.get("generation") or {}
    size = g.get("candidate_batch_size", g.get("stage2_batch_size", g.get("batch_size")))
    merged = g.get("candidates_merged_adapter", g.get("stage2_merged_adapter", False))
    return {"candidate_batch_size": size, "merged_adapter": bool(merged)}


def plot(methods: dict, path: Path) -> None:
    """RC's ω sweep (and Task-only, ω = 0) against Safe-CPL in the normalised reward-cost plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for suffix, style, label in (("", "-o", "balanced crowd"), ("_imbalanced", "--s", "imbalanced crowd")):
        names = ["task_only"] + sorted(n[:-len(suffix)] if suffix else n for n in methods
                                       if n.startswith("rc_") and n.endswith(suffix) and
                                       (suffix or not n.endswith("_imbalanced")))
        pts = [(methods[n + (suffix if n != "task_only" else "")]["normalized_cost"],
                methods[n + (suffix if n != "task_only" else "")]["normalized_reward"], n) for n in names
               if (n + (suffix if n != "task_only" else "")) in methods]
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color="tab:blue" if not suffix else "tab:gray",
                    label=f"RC ω sweep, {label}")
            for c, r, n in pts:
                ax.annotate(n.replace("rc_", "ω="), (c, r), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for m, marker in (("safe_cpl_search", "*"), ("safe_cpl_amortized", "P")):
            key = m + suffix
            if key in methods:
                row = methods[key]
                ax.errorbar(row["normalized_cost"], row["normalized_reward"],
                            xerr=[[row["normalized_cost"] - row["normalized_cost_ci"][0]],
                                  [row["normalized_cost_ci"][1] - row["normalized_cost"]]],
                            fmt=marker, ms=11, color="tab:red" if not suffix else "tab:pink",
                            label=f"{m} ({label})")
    if "oracle" in methods:
        ax.plot(methods["oracle"]["normalized_cost"], 1.0, "kD", label="oracle")
    ax.set_xlabel("normalised cost (harmful rate / task-only's)")
    ax.set_ylabel("normalised reward (task reward / oracle's)")
    ax.set_title("RC's ω sweep vs Safe-CPL (K = 4, embedded model)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build_parser() -> ToolParser:
    p = ToolParser(prog="scripts/safe_cpl_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--runs_dir", default="results/safe_cpl_runs", help="one downstream JSON per (arm, seed)")
    p.add_argument("--outputs_dir", default="outputs/safe_cpl_table", help="the runs' artefacts and checkpoints")
    p.add_argument("--out", default="results/safe_cpl_embedded.json")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--aggregate_only", action="store_true", help="only aggregate the runs already in --runs_dir")
    p.add_argument("recipe_args", nargs="*", help="extra recipe flags after --, e.g. -- --max_steps 100")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.seeds:
        raise SystemExit("--seeds: give at least one seed")
    if not args.aggregate_only:
        run_arms(args)
    aggregate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
