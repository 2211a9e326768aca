"""What the control validation run costs: each learner's measured step, validation and evaluation times at a
scale, projected over the suite's plan, so step counts are set by design, not by trial.

    python benchmarks/control_budget.py --tasks run circle --out results/control_budget.json

What is measured (one process, one torch thread, as a suite worker):

* **Set-up**: building each learner on the task's behaviour data (feedback, crowd, views).
* **Training**: every phase of every learner kind, timed on its own: the phase's first step
  (``entry``: a phase switch may freeze a reference or label the data once) and then
  ``--steps`` steps (``per_step``). Phases are shrunk to ``1 + --steps`` steps each through
  config overrides; network width, batch and segment length stay the scale's.
* **Evaluation**: one validation (``validate_goals`` x ``validate_episodes``) and one final
  evaluation (``eval_goals`` x ``eval_episodes``) of a trained policy per learner kind.

Projection: a method's run is ``setup + sum over phases (entry + (n_phase - 1) x per_step) +
n_validations x validation + final evaluation`` at the step counts of its *current* per-scale
config (``control.learners.default_config``); artefacts likewise (no final evaluation). A
PRESA-type run that shares the ``bc_warmup`` artefact is charged its preference phase only;
the artefact carries the warm-up and its validations. The plan is the suite's
(``control.suite.plan_jobs``) for ``--methods`` x ``--tasks`` x ``--seeds``; threshold arms and
imbalance arms cost what their base learner does, RC costs its measured probe at every weight.
``total_core_seconds`` sums the plan; ``wall_hours_at_jobs`` divides by ``--jobs`` (perfect
packing: a lower bound). Tasks without a measurement are not projected (``missing_tasks``).

Design decisions:

* Absolute seconds depend on the machine's load (written beside them, ``load_before`` /
  ``load_after``); they are a budget estimate, not a speed claim. Re-run this script after
  changing any step count: the projection always reads the current configs.
* Dependent learners get their artefacts trained here for ``--steps`` steps (their cost does not
  depend on how well the artefact is trained).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import control  # noqa: E402,F401  (installs the safety-gymnasium import shim)
from control.learners import (ARTEFACTS, METHODS, default_config, get_method, load_task_dataset,  # noqa: E402
                              train_artefact)
from control.learners.base import evaluate_downstream, validate  # noqa: E402
from control.suite import plan_jobs  # noqa: E402
from llm_safepref.core.cli import ToolParser  # noqa: E402
from llm_safepref.core.provenance import run_record, write_json  # noqa: E402
from llm_safepref.core.tables import markdown_table  # noqa: E402

#: The learner kinds measured: probe name -> the method (or artefact) that is built and timed.
PROBES = {"presa": "presa", "cpl": "cpl", "bc_safe": "bc_safe", "td3bc": "task_only", "td3bc_lag": "td3bc_lag",
          "rc": "rc_0.5", "reward_model": "reward_model", "latent_encoder": "latent_encoder",
          "safe_cpl": "safe_cpl", "safe_vpl": "safe_vpl"}

#: The validation run's methods (docs/control.md, "The small validation run"): every method but the
#: ``_shared`` check of the authors' encoder arrangement.
VALIDATION_METHODS = tuple(m for m in METHODS if not m.endswith("_shared"))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"uptime unavailable ({e})"


def probe_of(name: str) -> str:
    """The probe whose measurement a suite method or artefact costs."""
    if name in ARTEFACTS:
        return {"bc_warmup": "presa"}.get(name, "reward_model" if name.startswith("reward_model") else name)
    base = name.removesuffix("_imbalanced").removesuffix("_shared")
    for arm in ("_k0.5", "_k2"):
        base = base.removesuffix(arm)
    if base.startswith("rc_"):
        return "rc"
    if base in ("task_only", "oracle"):
        return "td3bc"
    if base not in PROBES:
        raise ValueError(f"no probe for {name!r}")
    return base


def phases_of(config) -> list[int]:
    """Step counts of a config's phases, in order (their sum is ``config.steps``)."""
    if hasattr(config, "phase_steps") and getattr(config, "has_stage2", True):
        before = [int(n) for n in config.phase_steps()]
        return [*before, int(config.steps) - sum(before)]
    if hasattr(config, "bc_warmup_steps"):
        return [int(config.bc_warmup_steps), int(config.steps) - int(config.bc_warmup_steps)]
    return [int(config.steps)]


def shrunk_overrides(config, k: int) -> dict[str, str]:
    """Overrides giving every phase of ``config`` exactly ``k`` steps (no validation, no checkpoints)."""
    n = len(phases_of(config))
    over = {"steps": str(n * k), "validate_every": "0", "checkpoint_every": str(10 ** 9), "log_every": str(10 ** 9)}
    if hasattr(config, "bc_warmup_steps"):
        over["bc_warmup_steps"] = str(k)
    if hasattr(config, "stage1_steps") and not getattr(config, "shared_encoder", False):
        over["stage1_steps"] = str(k)
    if hasattr(config, "policy_steps"):
        over["policy_steps"] = str(k)
    return over


class _ConfigOnly:
    """A learner class's ``can_validate`` on a config alone (every learner's reads only ``self.config``)."""

    def __init__(self, cls, config):
        self.cls, self.config = cls, config

    def can_validate(self, done: int) -> bool:
        return bool(self.cls.can_validate(self, done))


def n_validations(config, learner, after: int = 0) -> int:
    """Validations of a run of ``config`` after step ``after``."""
    ve = int(config.validate_every)
    if not ve:
        return 0
    return sum(1 for done in range(ve, int(config.steps) + 1, ve) if done > after and learner.can_validate(done))


def measure(task: str, probe: str, ds, k: int, seed: int, work: Path, data_dir: str | None,
            scale: str = "small") -> dict:
    """Set-up, per-phase entry and per-step seconds, one validation and one final evaluation of a probe."""
    name = PROBES[probe]
    spec = get_method(name) if name in METHODS else ARTEFACTS[name]
    full = default_config(name, task, scale)
    kwargs = {}
    for need in spec.requires:  # artefacts, briefly trained
        folder = work / f"{task}__{need}"
        a_cfg = default_config(need, task, scale)
        train_artefact(need, task, seed, scale, folder, data_dir=data_dir,
                       overrides=shrunk_overrides(a_cfg, k))
        kwargs[ARTEFACTS[need].provides or need] = str(folder)
    cfg = default_config(name, task, scale, shrunk_overrides(full, k))
    t0 = time.perf_counter()
    learner = spec.learner(cfg, ds, seed, **kwargs)
    setup = time.perf_counter() - t0
    phases = []
    step = 0
    for _ in phases_of(cfg):
        t0 = time.perf_counter()
        learner.train_step(step)
        entry = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(step + 1, step + k):
            learner.train_step(s)
        phases.append({"entry_seconds": entry, "per_step_seconds": (time.perf_counter() - t0) / max(k - 1, 1)})
        step += k
    out = {"method": name, "setup_seconds": setup, "phases": phases, "steps_timed_per_phase": k,
           "batch_size": int(cfg.batch_size), "hidden": int(cfg.hidden)}
    if name in METHODS:
        t0 = time.perf_counter()
        validate(learner, step)
        out["validation_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_downstream(learner.policy(), ds, cfg, seed)
        out["evaluation_seconds"] = time.perf_counter() - t0
        out["evaluation"] = {"goals": int(cfg.eval_goals), "episodes": int(cfg.eval_episodes),
                             "validate_goals": int(cfg.validate_goals), "validate_episodes": int(cfg.validate_episodes),
                             "horizon": int(ds.meta["max_episode_steps"])}
    return out


def project(task: str, name: str, m: dict, scale: str = "small") -> dict:
    """Projected seconds of one run of ``name`` on ``task`` at its current config of ``scale``."""
    spec = get_method(name) if name in METHODS else ARTEFACTS[name]
    cfg = default_config(name, task, scale)
    steps = phases_of(cfg)
    if len(steps) != len(m["phases"]):
        raise ValueError(f"{name}: {len(steps)} phases in the config, {len(m['phases'])} measured")
    shared_warmup = "bc_warmup" in getattr(spec, "shares", ())  # its BC phase is the bc_warmup artefact's
    train = sum(0.0 if n == 0 or (shared_warmup and i == 0) else p["entry_seconds"] + (n - 1) * p["per_step_seconds"]
                for i, (n, p) in enumerate(zip(steps, m["phases"])))
    # A shared warm-up's validations are the artefact's.
    nval = n_validations(cfg, _ConfigOnly(spec.learner, cfg), after=cfg.bc_warmup_steps if shared_warmup else 0)
    val = nval * m.get("validation_seconds", 0.0) * cfg.validate_goals * cfg.validate_episodes / max(
        m["evaluation"]["validate_goals"] * m["evaluation"]["validate_episodes"], 1) if nval else 0.0
    final = m.get("evaluation_seconds", 0.0) if name in METHODS else 0.0
    return {"steps": steps, "train_seconds": train, "n_validations": nval, "validation_seconds": val,
            "evaluation_seconds": final, "setup_seconds": m["setup_seconds"],
            "seconds": m["setup_seconds"] + train + val + final}


def main(argv=None) -> int:
    p = ToolParser(description=__doc__.split("\n\n")[0], prog="python benchmarks/control_budget.py")
    p.add_argument("--tasks", nargs="+", default=["run"], help="tasks measured (their small data must be built)")
    p.add_argument("--probes", nargs="+", default=list(PROBES), choices=list(PROBES), help="learner kinds measured")
    p.add_argument("--methods", nargs="+", default=list(VALIDATION_METHODS), help="the suite's methods projected")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the suite's seeds projected")
    p.add_argument("--jobs", type=int, default=2, help="suite workers (the wall-hours divisor)")
    p.add_argument("--steps", type=int, default=20, help="steps timed per phase (after its first)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data_dir", default=None, help="behaviour data folder (default: the cache)")
    p.add_argument("--measured", default=None,
                   help="an earlier results JSON: re-project its measurements at the current configs, measure nothing")
    p.add_argument("--out", default="results/control_budget.json", help="results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, t_start = uptime(), time.time()
    measured: dict[str, dict[str, dict]] = {}
    if args.measured:  # re-project an earlier measurement at the current configs
        earlier = json.loads(Path(args.measured).read_text())
        measured = {t: earlier["measured"][t] for t in args.tasks if t in earlier["measured"]}
        load_before = earlier["load_before"]
    with tempfile.TemporaryDirectory(prefix="control_budget_") as tmp:
        for task in ([] if args.measured else args.tasks):
            ds = load_task_dataset(task, "small", 0, args.data_dir)
            measured[task] = {}
            for probe in args.probes:
                t0 = time.time()
                measured[task][probe] = measure(task, probe, ds, args.steps, 0, Path(tmp), args.data_dir)
                print(f"[{time.strftime('%H:%M:%S')}] {task} {probe}: {time.time() - t0:.1f} s", flush=True)
    jobs = plan_jobs(args.tasks, args.methods, args.seeds)
    runs: dict[str, dict[str, dict]] = {}
    total = 0.0
    missing = set()
    for job in jobs:
        probe = probe_of(job.name)
        m = measured.get(job.task, {}).get(probe)
        if m is None:
            missing.add(f"{job.task}/{probe}")
            continue
        key = runs.setdefault(job.task, {})
        if job.name not in key:
            key[job.name] = project(job.task, job.name, m)
        total += key[job.name]["seconds"]
    per_task = {t: sum(r["seconds"] for r in rs.values()) * len(args.seeds) for t, rs in runs.items()}
    record = run_record(
        benchmark="control_budget", scale="small", tasks=args.tasks, methods=list(args.methods), seeds=args.seeds,
        jobs=args.jobs, threads=args.threads, steps_timed_per_phase=args.steps, load_before=load_before,
        load_after=earlier["load_after"] if args.measured else uptime(), measured_in=args.measured, seconds=round(time.time() - t_start, 1), measured=measured, projected=runs,
        core_seconds_per_task=per_task, total_core_seconds=total, n_runs=len(jobs),
        wall_hours_at_jobs=total / args.jobs / 3600, missing=sorted(missing),
        note="projection at the current small configs; seconds measured under the load written beside them")
    write_json(args.out, record)
    rows = []
    for task, rs in runs.items():
        for name, r in rs.items():
            rows.append([task, name, " + ".join(map(str, r["steps"])), f"{r['train_seconds']:.0f}",
                         f"{r['n_validations']} / {r['validation_seconds']:.0f}", f"{r['evaluation_seconds']:.0f}",
                         f"{r['seconds']:.0f}"])
    print(markdown_table(["task", "run", "steps", "train s", "validations / s", "final eval s", "total s"], rows))
    print(f"{len(jobs)} runs, {total:.0f} core-seconds = {total / args.jobs / 3600:.2f} h at --jobs {args.jobs}"
          + (f"; not projected: {', '.join(sorted(missing))}" if missing else ""))
    print(f"load before: {load_before}\nload after:  {record['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
