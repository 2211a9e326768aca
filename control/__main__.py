"""Command line of control/: ``python -m control <command> ...`` from the repository root.

Flags follow the toolkit's convention (``llm_safepref.core.cli.ToolParser``): ``--snake_case``
is canonical and ``--kebab-case`` is accepted (``--data_dir`` = ``--data-dir``). Every
command answers ``--help``.

Commands:
  tasks                         list the six tasks, their goals and cost definitions
  build-data  --tasks T.. --scale S --seed N [--data_dir D] [--force] [--jobs 2]
                                build (or load from cache) behaviour datasets
  stats       --tasks T.. --scale S --seed N [--out results/control_data_<S>.json]
                                summary statistics of built datasets (returns, costs, unsafe segments)
  feedback    --task T --scale S --kind crowd|presa [--beta B] [--label_noise P] [...] --out F.npz
                                synthetic feedback from a dataset
  suite       --tasks T.. --methods M.. --seeds 0 1 2 --scale S --out DIR [--backend local|ray] [--jobs N]
              [--shard i/n] [--aggregate]
                                the benchmark: every (task, method, seed) run, resumable; DIR/table.json + .md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from control import tool_command
from control.data import SCALES, build_and_cache, dataset_path, load_dataset
from control.feedback import (CrowdFeedbackConfig, PresaFeedbackConfig, dataset_statistics, make_crowd_feedback,
                              make_presa_feedback)
from control.learners import method_names
from control.suite import SuiteError, run_suite
from control.tasks import TASKS, task_names
from llm_safepref.core.cli import ToolParser
from llm_safepref.core.provenance import redact, run_record, write_json

__all__ = ["build_parser", "main", "COMMANDS"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring verbatim, and every flag's default in ``--help``."""


def _cmd_tasks(args) -> int:
    for name, spec in TASKS.items():
        print(f"{name:16s} {spec.env_id:30s} users={spec.user_goals.tolist()} "
              f"downstream={len(spec.downstream_goals)} T={spec.max_episode_steps} kappa={spec.cost_threshold}")
        print(f"{'':16s} {spec.description}")
    return 0


def _cmd_build(args) -> int:
    jobs = [(t, args.scale, args.seed, args.data_dir, args.force, args.threads, args.command_line)
            for t in args.tasks]
    if args.jobs <= 1:
        for job in jobs:
            build_and_cache(*job)
        return 0
    # One process per task (each with its own simulators and `threads` torch threads).
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for fut in [pool.submit(build_and_cache, *job) for job in jobs]:
            fut.result()
    return 0


def _cmd_stats(args) -> int:
    out = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            out = json.load(f)
    for task in args.tasks:
        path = dataset_path(task, args.scale, args.seed, args.data_dir)
        if not path.exists():
            print(f"[{task}] no dataset at {path}; skipped", file=sys.stderr)
            continue
        ds = load_dataset(path)
        # The file is merged per task, so each task's entry carries the run record of the
        # stats run that wrote it (the build's own record is in its fields, from the dataset).
        out[task] = {**dataset_statistics(ds, segment_length=args.segment_length),
                     "stats_run_record": run_record(command=args.command_line)}
        print(json.dumps({task: {k: out[task][k] for k in ("n_transitions", "unsafe_segment_fraction")}}))
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


def _cmd_feedback(args) -> int:
    ds = load_dataset(dataset_path(args.task, args.scale, args.seed, args.data_dir))
    if args.kind == "crowd":
        cfg = CrowdFeedbackConfig(n_query_sets=args.n, segment_length=args.segment_length, set_size=args.set_size,
                                  label_noise=args.label_noise, beta=args.beta, seed=args.seed)
        fb = make_crowd_feedback(ds, cfg)
    else:
        cfg = PresaFeedbackConfig(n_pairs=args.n, segment_length=args.segment_length, goal_id=args.goal_id,
                                  label_noise=args.label_noise, beta=args.beta, seed=args.seed)
        fb = make_presa_feedback(ds, cfg)
    record = run_record(command=args.command_line, task=args.task, scale=args.scale, kind=args.kind,
                        config=dataclasses.asdict(cfg))
    fb["meta"] = np.array(json.dumps(redact(record)))
    np.savez_compressed(args.out, **fb)
    print(f"wrote {args.out} ({len(fb['chosen'])} pairs)")
    return 0


def _cmd_suite(args) -> int:
    try:
        return run_suite(args.tasks, args.methods, args.seeds, args.scale, args.out, backend=args.backend,
                         jobs=args.jobs, shard=args.shard, do_aggregate=args.aggregate, address=args.address,
                         data_dir=args.data_dir, data_seed=args.data_seed, work_dir=args.work_dir,
                         overrides=args.set, command=args.command_line, ensemble=args.ensemble)
    except SuiteError as e:
        print(f"python -m control suite: error: {e}", file=sys.stderr)
        return 2


#: Subcommand -> (handler, one-line help).
COMMANDS = {
    "tasks": (_cmd_tasks, "list the tasks"),
    "build-data": (_cmd_build, "build behaviour datasets (cached)"),
    "stats": (_cmd_stats, "dataset statistics to JSON"),
    "feedback": (_cmd_feedback, "synthetic feedback"),
    "suite": (_cmd_suite, "the benchmark suite: learners x tasks x seeds, resumable, local pool or Ray"),
}


def build_parser() -> ToolParser:
    """The parser of ``python -m control``: ``ToolParser`` (``--snake_case``, ``--kebab-case`` accepted)."""
    p = ToolParser(prog="python -m control", description=__doc__, formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ToolParser)
    parsers = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}

    def common(sp, many=True):
        if many:
            sp.add_argument("--tasks", nargs="+", default=task_names(), choices=task_names(), help="tasks")
        else:
            sp.add_argument("--task", required=True, choices=task_names(), help="task")
        sp.add_argument("--scale", default="smoke", choices=SCALES, help="data scale")
        sp.add_argument("--seed", type=int, default=0, help="build seed (also the feedback seed)")
        sp.add_argument("--data_dir", default=None, help="dataset folder (None: <cache root>/control_data, "
                                                         "cache root $LLM_SAFEPREF_CACHE or ~/.cache/llm_safepref)")

    b = parsers["build-data"]
    common(b)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--threads", type=int, default=1, help="torch threads per build process")
    b.add_argument("--jobs", type=int, default=1, help="tasks built in parallel processes")
    s = parsers["stats"]
    common(s)
    s.add_argument("--segment_length", type=int, default=64, help="steps per segment")
    s.add_argument("--out", default=None, help="JSON file (merged per task)")
    f = parsers["feedback"]
    common(f, many=False)
    f.add_argument("--kind", choices=["crowd", "presa"], required=True, help="feedback kind")
    f.add_argument("--n", type=int, default=100, help="query sets (crowd) or pairs (presa)")
    f.add_argument("--segment_length", type=int, default=64, help="steps per segment")
    f.add_argument("--set_size", type=int, default=16, help="pairs per query set (crowd)")
    f.add_argument("--goal_id", type=int, default=0, help="user goal whose reward defines the preference (presa)")
    f.add_argument("--label_noise", type=float, default=0.0, help="probability of flipping a preference label")
    f.add_argument("--beta", type=float, default=None, help="Boltzmann rationality (None: argmax labels)")
    f.add_argument("--out", required=True, help="output .npz")
    u = parsers["suite"]
    u.add_argument("--tasks", nargs="+", default=task_names(), help=f"tasks ({', '.join(task_names())})")
    u.add_argument("--methods", nargs="+", default=method_names(), help=f"methods ({', '.join(method_names())})")
    u.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="learner seeds")
    u.add_argument("--scale", default="smoke", help=f"data and learner scale ({', '.join(SCALES)})")
    u.add_argument("--out", required=True, help="results folder: runs/<task>__<method>__seed<s>.json, table.json/.md")
    u.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: this process (--jobs 1) or a process pool; ray: one Ray task per run")
    u.add_argument("--jobs", type=int, default=1, help="parallel workers (Ray: CPUs of a local instance)")
    u.add_argument("--shard", default=None, help="i/n: only the (task, seed) groups k with k %% n == i")
    u.add_argument("--aggregate", action="store_true", help="merge every run file of --out into table.json/.md")
    u.add_argument("--address", default=None, help="Ray cluster address for ray.init (None: a local instance)")
    u.add_argument("--data_dir", default=None, help="dataset folder (None: <cache root>/control_data)")
    u.add_argument("--data_seed", type=int, default=0, help="build seed of the datasets")
    u.add_argument("--work_dir", default=None, help="checkpoints, logs, artefacts (None: <cache root>/control_suite/"
                                                    "<out name>-<hash>); never inside results/")
    u.add_argument("--set", nargs="*", default=[], metavar="[METHOD:]FIELD=VALUE",
                   help="config overrides, e.g. steps=400 presa:objective.safety_delta=0.8")
    u.add_argument("--ensemble", action="store_true",
                   help="train the seeds of presa / cpl as one batched ensemble (control/learners/ensemble.py; on a "
                        "CPU it pays off only at smoke sizes, see docs/control.md, Throughput)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = tool_command("control", argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
