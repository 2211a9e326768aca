"""The PRESA table over training seeds: PRESA, DPO (PRESA's learning rate and its own best one) and KTO.

    python scripts/presa_table.py --seeds 0 1 2 --jobs 2 --threads 1
    python scripts/presa_table.py --aggregate_only

Units (each one recipe run, ``accelerate launch recipes/<recipe>.py``, its ``run_metrics.json``
copied to ``<runs_dir>/<unit>.json``; a unit whose file is there is kept, so the same command
resumes a stopped table, and a unit killed midway restarts from its last checkpoint):

1. ``dpo_val_lr<lr>``: DPO on the *validation* split for each ``--dpo_lrs`` (seed 0). DPO's own
   best learning rate is chosen there, never on test (:func:`choose_lr`), and written with
   every candidate's figures to ``<runs_dir>/dpo_lr_choice.json``.
2. ``presa_seed<s>`` (``recipes/presa_lora.py`` at its defaults), ``dpo_seed<s>``
   (``recipes/dpo.py --learning_rate`` PRESA's learning rate), ``kto_seed<s>`` (``recipes/kto.py``),
   then ``dpo_best_seed<s>`` (``recipes/dpo.py`` at the chosen rate; when that is PRESA's rate
   the ``dpo`` runs are those seeds and nothing more runs).

Units run ``--jobs`` at a time (a thread pool of recipe subprocesses), each with ``--threads``
torch threads. Aggregation is ``scripts/compare_methods.py`` (seed means, ``_std``, two-level
intervals, paired comparisons against PRESA, goals on seed means, judge-corrected rates with
``--judge_audit``): the table's ``--out`` JSON and its ``.md``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import compare_methods  # noqa: E402
from llm_safepref.core.cli import ToolParser  # noqa: E402
from llm_safepref.core.provenance import write_json  # noqa: E402

RECIPES = {"presa": "presa_lora.py", "dpo": "dpo.py", "kto": "kto.py"}


def _recipe_default(recipe: str, key: str):
    import yaml

    name = {"presa": "presa_lora", "dpo": "dpo", "kto": "kto"}[recipe]
    return yaml.safe_load((ROOT / "llm_safepref" / "recipes" / "configs" / f"{name}.yaml").read_text())[key]


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def choose_lr(candidates: dict[float, dict]) -> dict:
    """DPO's best learning rate from its validation runs (``lr -> run_metrics``).

    The rule is the PRESA goals' (``compare_methods.goals``, against the same base evaluation):
    among the rates that keep over-refusal and instruction following within their goals, the one
    with the lowest harmful compliance; ties go to the lower over-refusal, then the smaller rate.
    When no rate keeps both, the one meeting the most goals, then the same order.
    """
    if not candidates:
        raise ValueError("no DPO validation run to choose a learning rate from")
    rows = []
    for lr, run in candidates.items():
        g = compare_methods.goals(run["before"], run["after"])
        keeps = g["over_refusal_at_most_base_plus_10_points"] and g["instruction_following_at_least_base_minus_5_points"]
        a = run["after"]
        rows.append({"learning_rate": lr, "keeps_over_refusal_and_instruction_following": bool(keeps),
                     "goals_met": int(sum(g.values())), "goals": g,
                     "harmful_compliance_rate": a["harmful_compliance_rate"],
                     "over_refusal_rate": a["over_refusal_rate"],
                     "instruction_following_rate": a["instruction_following_rate"]})
    key = lambda r: (not r["keeps_over_refusal_and_instruction_following"], -r["goals_met"],  # noqa: E731
                     r["harmful_compliance_rate"], r["over_refusal_rate"], r["learning_rate"])
    best = min(rows, key=key)
    base = next(iter(candidates.values()))["before"]
    return {"chosen_learning_rate": best["learning_rate"], "rule": choose_lr.__doc__.split("\n\n")[1].strip(),
            "split": base.get("split"), "n_prompts": base.get("n_prompts"), "n_by_category": base.get("n_by_category"),
            "base": {k: base[k] for k in compare_methods.RATES},
            "candidates": sorted(rows, key=lambda r: r["learning_rate"])}


class Table:
    def __init__(self, args):
        self.args = args
        self.runs = Path(args.runs_dir)
        self.outputs = Path(args.outputs_dir)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.presa_lr = float(_recipe_default("presa", "learning_rate"))

    def command(self, unit: str, recipe: str, seed: int, flags: list[str]) -> list[str]:
        from transformers.trainer_utils import get_last_checkpoint

        out = self.outputs / unit
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
               "--num_cpu_threads_per_process", str(self.args.threads), str(ROOT / "recipes" / RECIPES[recipe]),
               "--seed", str(seed), "--output_dir", str(out), "--results_file", str(self.runs / f"{unit}.json"),
               *flags, *self.args.recipe_args]
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last:
            cmd += ["--resume_from_checkpoint", last]
        return cmd

    def run_unit(self, unit: str, recipe: str, seed: int, flags: list[str]) -> Path:
        target = self.runs / f"{unit}.json"
        if target.exists():
            print(f"{target}: done, kept", flush=True)
            return target
        cmd = self.command(unit, recipe, seed, flags)
        log = self.outputs / f"{unit}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {unit}: {shlex.join(cmd)}  (log {log})", flush=True)
        t0 = time.time()
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        with open(log, "a") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not target.exists():
            raise RuntimeError(f"{unit} failed (exit {proc.returncode}); see {log}")
        print(f"[{time.strftime('%H:%M:%S')}] {unit}: {time.time() - t0:.0f} s -> {target}", flush=True)
        return target

    def pool(self, units: list[tuple]) -> None:
        with ThreadPoolExecutor(max_workers=self.args.jobs) as ex:
            for f in [ex.submit(self.run_unit, *u) for u in units]:
                f.result()

    def validation_units(self) -> list[tuple]:
        return [(f"dpo_val_lr{_lr_tag(lr)}", "dpo", 0, ["--learning_rate", repr(lr), "--eval_split", "validation"])
                for lr in self.args.dpo_lrs]

    def seed_units(self) -> list[tuple]:
        units = []
        for seed in self.args.seeds:
            units.append((f"presa_seed{seed}", "presa", seed, []))
            units.append((f"dpo_seed{seed}", "dpo", seed, ["--learning_rate", repr(self.presa_lr)]))
            units.append((f"kto_seed{seed}", "kto", seed, []))
        return [u for u in units if u[1] in self.args.methods]

    def choice(self) -> dict | None:
        files = {lr: self.runs / f"dpo_val_lr{_lr_tag(lr)}.json" for lr in self.args.dpo_lrs}
        if not all(f.exists() for f in files.values()):
            return None
        choice = choose_lr({lr: json.loads(f.read_text()) for lr, f in files.items()})
        choice["sources"] = {_lr_tag(lr): str(f) for lr, f in files.items()}
        write_json(self.runs / "dpo_lr_choice.json", choice)
        return choice

    def best_units(self, choice: dict) -> list[tuple]:
        lr = choice["chosen_learning_rate"]
        if lr == self.presa_lr or "dpo" not in self.args.methods:
            return []
        return [(f"dpo_best_seed{s}", "dpo", s, ["--learning_rate", repr(lr)]) for s in self.args.seeds]

    def run(self) -> None:
        """Every unit in one pool of ``--jobs`` workers. DPO's best-rate units are queued as soon as the
        validation units are done (behind the seed units still waiting), so no worker idles at a phase end."""
        if "dpo" not in self.args.methods:
            self.pool(self.seed_units())
            return
        with ThreadPoolExecutor(max_workers=self.args.jobs) as ex:
            validation = [ex.submit(self.run_unit, *u) for u in self.validation_units()]
            seeds = [ex.submit(self.run_unit, *u) for u in self.seed_units()]
            for f in validation:
                f.result()
            choice = self.choice()
            print(f"DPO's learning rate on validation: {choice['chosen_learning_rate']:g}", flush=True)
            best = [ex.submit(self.run_unit, *u) for u in self.best_units(choice)]
            for f in seeds + best:
                f.result()

    def aggregate(self) -> dict | None:
        runs: dict[str, list[Path]] = {}
        presa_lr = _lr_tag(self.presa_lr)
        choice = self.choice()
        names = {"presa": "presa", "dpo": f"dpo_lr{presa_lr}", "kto": "kto"}
        for seed in self.args.seeds:
            for prefix, name in names.items():
                f = self.runs / f"{prefix}_seed{seed}.json"
                if f.exists():
                    runs.setdefault(name, []).append(f)
        if choice is not None:
            best = _lr_tag(choice["chosen_learning_rate"])
            prefix = "dpo" if best == presa_lr else "dpo_best"
            files = [self.runs / f"{prefix}_seed{s}.json" for s in self.args.seeds]
            if any(f.exists() for f in files):
                runs[f"dpo_best_lr{best}"] = [f for f in files if f.exists()]
        if "presa" not in runs:
            print("no PRESA run yet: nothing to aggregate", flush=True)
            return None
        argv = [x for name, files in runs.items() for x in ("--run", f"{name}=" + ",".join(map(str, files)))]
        argv += ["--judge_audit", self.args.judge_audit, "--out", self.args.out]
        compare_methods.main(argv)
        result = json.loads(Path(self.args.out).read_text())
        result["table_command"] = shlex.join(["python", "scripts/presa_table.py", *sys.argv[1:]])
        result["dpo_lr_choice"] = choice
        result["missing"] = [f"{prefix}_seed{s}" for s in self.args.seeds for prefix in
                             [*names, *(["dpo_best"] if choice and _lr_tag(choice["chosen_learning_rate"]) != presa_lr else [])]
                             if not (self.runs / f"{prefix}_seed{s}.json").exists()]
        result["aggregated_on"] = date.today().isoformat()
        write_json(self.args.out, result)
        return result


def build_parser() -> ToolParser:
    p = ToolParser(prog="scripts/presa_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--dpo_lrs", type=float, nargs="+", default=[1e-4, 1.5e-4, 2e-4, 3e-4],
                   help="DPO's learning rates tried on the validation split")
    p.add_argument("--runs_dir", default="results/presa_runs", help="one run_metrics JSON per unit")
    p.add_argument("--outputs_dir", default="outputs/presa_table", help="the runs' adapters, checkpoints and logs")
    p.add_argument("--out", default="results/presa_embedded.json")
    p.add_argument("--judge_audit", default="results/judge_audit.json")
    p.add_argument("--jobs", type=int, default=1, help="units run side by side")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per unit")
    p.add_argument("--aggregate_only", action="store_true", help="only aggregate the unit files already there")
    p.add_argument("recipe_args", nargs="*", help="extra recipe flags after --, applied to every unit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        build_parser().error("--jobs and --threads must be at least 1")
    table = Table(args)
    if not args.aggregate_only:
        table.run()
    table.aggregate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
