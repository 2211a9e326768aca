"""Control learner throughput: the seeds of a run as one batched ensemble vs one model per seed, side by side.

    python benchmarks/control_throughput.py --out results/control_throughput.json

What is measured (same process, same data, interleaved rounds):

* **Preference learner** (``--method presa`` or ``cpl``): segment pairs per second of training
  the ``--seeds`` of one run (a) as ``control.learners.ensemble.PresaEnsemble`` (stacked weights,
  ``torch.func.vmap``; each member its own minibatches) and (b) as a straightforward loop that
  steps one ``PresaLearner`` per seed. Both phases of a PRESA run are timed separately: the BC
  warm-up (2 segment forwards a step) and the preference phase (2 policy + 2 reference forwards
  a step). Pairs per second = members x batch size x steps / seconds.
* **Evaluation**: env steps per second of evaluating every seed's policy on held-out goals
  (``control.learners.base.evaluate_downstream``) with ``n_envs = 1`` (one env at a time, one
  policy call per env step) against ``--eval_n_envs`` envs stepped in lockstep with one batched
  policy call (``control.evaluation.evaluate_policy``'s batching).

Design decisions:

* Learner settings ``--settings smoke|small`` are the method's per-scale config (network width,
  batch, segment length) on the task's *smoke* behaviour data (built in seconds into the cache if
  missing; the network sizes are what costs, not the dataset): ``small`` is the validation run's
  setting, ``smoke`` shows the dispatch-bound regime of tiny nets.
* Rounds interleave the two variants, alternating which goes first; a ratio is formed within a
  round and the reported figure is the median of the per-round ratios with their min and max.
  One torch thread (``--threads``, as the suite's workers use), and the machine's load
  (``uptime``) before and after is written into the record: other jobs share these cores, so
  ratios, not absolute rates, are the figures to read.
* The record is the toolkit's ``run_record`` (command, git revision, versions, lock hash,
  machine, date) plus the figures, written atomically by ``write_json``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import control  # noqa: E402,F401  (installs the safety-gymnasium import shim)
from control.data import load_or_build  # noqa: E402
from control.learners import default_config, get_method  # noqa: E402
from control.learners.base import evaluate_downstream  # noqa: E402
from control.learners.ensemble import ENSEMBLE_METHODS, PresaEnsemble  # noqa: E402
from llm_safepref.core.cli import ToolParser  # noqa: E402
from llm_safepref.core.provenance import current_command, run_record, write_json  # noqa: E402
from llm_safepref.core.tables import markdown_table  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"uptime unavailable ({e})"


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": len(xs)}


def time_steps(step_fn, first_step: int, n: int) -> float:
    t0 = time.perf_counter()
    for k in range(n):
        step_fn(first_step + k)
    return time.perf_counter() - t0


#: Training steps per variant per round (a round of each variant takes about a second or more).
STEPS_PER_ROUND = {"smoke": 40, "small": 8, "paper": 8}


def bench_learner(args, ds, settings: str) -> dict:
    """Pairs per second, ensemble vs loop, for both phases of a PRESA / CPL run."""
    per_round = args.steps_per_round or STEPS_PER_ROUND[settings]
    warm = per_round * args.rounds  # BC warm-up long enough for every BC round
    cfg = default_config(args.method, args.task, settings,
                         {"bc_warmup_steps": str(warm), "steps": str(warm + per_round * args.rounds + 1)})
    cls = get_method(args.method).learner
    loop = [cls(cfg, ds, s) for s in args.seeds]
    members = [cls(cfg, ds, s) for s in args.seeds]
    ens = PresaEnsemble(members)
    pairs = len(args.seeds) * cfg.batch_size * per_round

    def loop_step(step):
        for ln in loop:
            ln.train_step(step)

    out = {}
    for phase, start in (("bc_warmup", 0), ("preference", warm)):
        if phase == "preference":  # both variants take the warm-up's last step (pi_ref frozen) untimed
            loop_step(warm)
            ens.train_step(warm)
            start = warm + 1
        rates = {"ensemble": [], "loop": []}
        ratios = []
        for r in range(args.rounds):
            first = start + r * per_round
            order = ("ensemble", "loop") if r % 2 == 0 else ("loop", "ensemble")
            secs = {}
            for name in order:
                fn = ens.train_step if name == "ensemble" else loop_step
                secs[name] = time_steps(fn, first, per_round)
                rates[name].append(pairs / secs[name])
            ratios.append(secs["loop"] / secs["ensemble"])
        out[phase] = {"pairs_per_second": {k: spread(v) for k, v in rates.items()},
                      "speedup_ensemble_over_loop": spread(ratios)}
    ens.sync()
    out["config"] = {"hidden": cfg.hidden, "layers": cfg.layers, "batch_size": cfg.batch_size,
                     "segment_length": cfg.segment_length, "members": len(args.seeds),
                     "steps_per_round": per_round}
    return out


def bench_eval(args, ds) -> dict:
    """Env steps per second of evaluating every seed's policy: one env at a time vs lockstep batches."""
    cfg = default_config(args.method, args.task, "smoke", {"eval_goals": str(args.eval_goals),
                                                           "eval_episodes": str(args.eval_n_envs)})
    cls = get_method(args.method).learner
    policies = [cls(cfg, ds, s).policy() for s in args.seeds]
    horizon = int(ds.meta["max_episode_steps"])
    rates = {"one_env": [], "batched": []}
    ratios = []
    for r in range(args.rounds):
        order = ("batched", "one_env") if r % 2 == 0 else ("one_env", "batched")
        secs, steps = {}, {}
        for name in order:
            c = default_config(args.method, args.task, "smoke", {
                "eval_goals": str(args.eval_goals), "eval_episodes": str(args.eval_n_envs),
                "eval_n_envs": "1" if name == "one_env" else str(args.eval_n_envs)})
            t0 = time.perf_counter()
            n = 0
            for seed, pol in zip(args.seeds, policies):
                res = evaluate_downstream(pol, ds, c, seed)
                n += res["metrics"]["eval/goals"] * c.eval_episodes * horizon  # upper bound: full episodes
            secs[name], steps[name] = time.perf_counter() - t0, n
            rates[name].append(n / secs[name])
        ratios.append(secs["one_env"] / secs["batched"])
    return {"env_steps_per_second": {k: spread(v) for k, v in rates.items()},
            "speedup_batched_over_one_env": spread(ratios),
            "config": {"goals": args.eval_goals, "episodes_per_goal": args.eval_n_envs, "n_envs": args.eval_n_envs,
                       "horizon": horizon, "policies": len(args.seeds),
                       "env_steps_counted": "goals x episodes x horizon per policy (episodes run to the horizon "
                                            "unless they terminate: an upper bound for terminating tasks)"}}


def main(argv=None) -> int:
    p = ToolParser(description=__doc__.split("\n\n")[0], prog="python benchmarks/control_throughput.py")
    p.add_argument("--task", default="run", help="control task (its smoke behaviour data are used)")
    p.add_argument("--method", default="presa", choices=ENSEMBLE_METHODS, help="preference learner")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds = ensemble members")
    p.add_argument("--settings", nargs="+", default=["small", "smoke"], choices=["smoke", "small", "paper"],
                   help="learner settings (per-scale config) to measure")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps_per_round", type=int, default=None,
                   help="training steps per variant per round (default: smoke 40, small and paper 8)")
    p.add_argument("--eval_goals", type=int, default=2, help="held-out goals per evaluation")
    p.add_argument("--eval_n_envs", type=int, default=4, help="lockstep envs (= episodes per goal)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data_dir", default=None, help="behaviour data folder (default: the cache)")
    p.add_argument("--out", default="results/control_throughput.json", help="results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = uptime()
    t0 = time.time()
    ds = load_or_build(args.task, "smoke", seed=0, data_dir=args.data_dir, command=current_command())
    learner = {s: bench_learner(args, ds, s) for s in args.settings}
    evaluation = bench_eval(args, ds)
    record = run_record(
        benchmark="control_throughput", task=args.task, method=args.method, seeds=args.seeds,
        threads=args.threads, rounds=args.rounds, data={"task": args.task, "scale": "smoke", "n": int(ds.n)},
        load_before=load_before, load_after=uptime(), seconds=round(time.time() - t0, 1),
        learner=learner, evaluation=evaluation,
        ratios={**{f"pairs_per_second_ensemble_over_loop/{s}/{ph}": learner[s][ph]["speedup_ensemble_over_loop"]
                   ["median"] for s in learner for ph in ("bc_warmup", "preference")},
                "env_steps_per_second_batched_over_one_env": evaluation["speedup_batched_over_one_env"]["median"]},
        note="ratios are medians of per-round ratios (variants interleaved in one process); the machine was "
             "shared with other jobs (see load_before / load_after)")
    write_json(args.out, record)
    rows = []
    for s, res in learner.items():
        for ph in ("bc_warmup", "preference"):
            r = res[ph]
            rows.append([f"{args.method} {s} {ph}", f"{r['pairs_per_second']['loop']['median']:.0f}",
                         f"{r['pairs_per_second']['ensemble']['median']:.0f}",
                         f"{r['speedup_ensemble_over_loop']['median']:.2f}x "
                         f"({r['speedup_ensemble_over_loop']['min']:.2f}-{r['speedup_ensemble_over_loop']['max']:.2f})"])
    e = evaluation
    rows.append([f"evaluation ({len(args.seeds)} policies)", f"{e['env_steps_per_second']['one_env']['median']:.0f}",
                 f"{e['env_steps_per_second']['batched']['median']:.0f}",
                 f"{e['speedup_batched_over_one_env']['median']:.2f}x"])
    print(markdown_table(["what", "one per seed / one env (per s)", "ensemble / batched (per s)", "ratio"], rows))
    print(f"load before: {load_before}\nload after:  {record['load_after']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
