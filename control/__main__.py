"""Command line of control/: ``python -m control <command> ...`` from the repository root.

Commands:
  tasks                         list the six tasks, their goals and cost definitions
  build-data  --tasks T.. --scale S --seed N [--data-dir D] [--force] [--jobs 2]
                                build (or load from cache) behaviour datasets
  stats       --tasks T.. --scale S --seed N [--out results/control_data_<S>.json]
                                summary statistics of built datasets (returns, costs, unsafe segments)
  feedback    --task T --scale S --kind crowd|presa [...] --out F.npz
                                synthetic feedback from a dataset
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import control  # noqa: F401  (installs the safety-gymnasium shim)


def _command_line() -> str:
    return "python -m control " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _cmd_tasks(args) -> int:
    from control.tasks import TASKS

    for name, spec in TASKS.items():
        print(f"{name:16s} {spec.env_id:30s} users={spec.user_goals.tolist()} "
              f"downstream={len(spec.downstream_goals)} T={spec.max_episode_steps} kappa={spec.cost_threshold}")
        print(f"{'':16s} {spec.description}")
    return 0


def _cmd_build(args) -> int:
    from control.data import build_and_cache as _build_one

    jobs = [(t, args.scale, args.seed, args.data_dir, args.force, args.threads, _command_line()) for t in args.tasks]
    if args.jobs <= 1:
        for job in jobs:
            _build_one(*job)
        return 0
    # One process per task (each with its own simulators and `threads` torch threads).
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for fut in [pool.submit(_build_one, *job) for job in jobs]:
            fut.result()
    return 0


def _cmd_stats(args) -> int:
    from control.data import dataset_path, load_dataset, machine_description
    from control.feedback import dataset_statistics

    out = {}
    if args.out and os.path.exists(args.out):
        out = json.loads(open(args.out).read())
    for task in args.tasks:
        path = dataset_path(task, args.scale, args.seed, args.data_dir)
        if not path.exists():
            print(f"[{task}] no dataset at {path}; skipped", file=sys.stderr)
            continue
        ds = load_dataset(path)
        out[task] = dataset_statistics(ds, segment_length=args.segment_length)
        out[task]["stats_command"] = _command_line()
        out[task]["stats_machine"] = machine_description()
        print(json.dumps({task: {k: out[task][k] for k in ("n_transitions", "unsafe_segment_fraction")}}))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _cmd_feedback(args) -> int:
    import numpy as np

    from control.data import dataset_path, load_dataset
    from control.feedback import CrowdFeedbackConfig, PresaFeedbackConfig, make_crowd_feedback, make_presa_feedback

    ds = load_dataset(dataset_path(args.task, args.scale, args.seed, args.data_dir))
    if args.kind == "crowd":
        cfg = CrowdFeedbackConfig(n_query_sets=args.n, segment_length=args.segment_length, set_size=args.set_size,
                                  label_noise=args.label_noise, beta=args.beta, seed=args.seed)
        fb = make_crowd_feedback(ds, cfg)
    else:
        cfg = PresaFeedbackConfig(n_pairs=args.n, segment_length=args.segment_length, seed=args.seed)
        fb = make_presa_feedback(ds, cfg)
    fb["meta"] = np.array(json.dumps({"command": _command_line(), "task": args.task, "scale": args.scale}))
    np.savez_compressed(args.out, **fb)
    print(f"wrote {args.out} ({len(fb['chosen'])} pairs)")
    return 0


def main(argv=None) -> int:
    from control.data import SCALES
    from control.tasks import task_names

    p = argparse.ArgumentParser(prog="python -m control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list the tasks")

    def common(sp, many=True):
        if many:
            sp.add_argument("--tasks", nargs="+", default=task_names(), choices=task_names(), help="tasks")
        else:
            sp.add_argument("--task", required=True, choices=task_names())
        sp.add_argument("--scale", default="smoke", choices=SCALES, help="data scale")
        sp.add_argument("--seed", type=int, default=0, help="build seed")
        sp.add_argument("--data-dir", default=None, help="dataset folder (default $LLM_SAFEPREF_CACHE/control_data)")

    b = sub.add_parser("build-data", help="build behaviour datasets (cached)")
    common(b)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--threads", type=int, default=1, help="torch threads per build process")
    b.add_argument("--jobs", type=int, default=1, help="tasks built in parallel processes (2 = both cores)")
    s = sub.add_parser("stats", help="dataset statistics to JSON")
    common(s)
    s.add_argument("--segment-length", type=int, default=64)
    s.add_argument("--out", default=None, help="JSON file (merged per task)")
    f = sub.add_parser("feedback", help="synthetic feedback")
    common(f, many=False)
    f.add_argument("--kind", choices=["crowd", "presa"], required=True)
    f.add_argument("--n", type=int, default=100, help="query sets (crowd) or pairs (presa)")
    f.add_argument("--segment-length", type=int, default=64)
    f.add_argument("--set-size", type=int, default=16)
    f.add_argument("--label-noise", type=float, default=0.0)
    f.add_argument("--beta", type=float, default=None, help="Boltzmann rationality (None: argmax labels)")
    f.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return {"tasks": _cmd_tasks, "build-data": _cmd_build, "stats": _cmd_stats, "feedback": _cmd_feedback}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
