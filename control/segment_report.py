"""Unsafe 64-step segments of a built dataset per user goal, lambda and data source.

``python -m control.segment_report --task swimmer_vel --scale small --seed 0 [--out F.json]``
prints (and with ``--out`` writes) JSON: the run record of ``llm_safepref.core.provenance``
and, for every (goal id, lambda, source) and for every goal id, the number of non-overlapping
segments inside episodes and how many are unsafe (segment cost > kappa * L / T,
``control.feedback.segment_cost_threshold``, the same rule as ``python -m control stats``'s
``unsafe_segment_fraction``). Goal id -1 is goal-free data (the gait pre-search).
"""

from __future__ import annotations

import json

from control import tool_command
from control.data import dataset_path, load_dataset
from control.feedback import segment_cost_threshold
from llm_safepref.core.cli import ToolParser
from llm_safepref.core.provenance import redact, run_record, write_json

__all__ = ["unsafe_segments_by_condition", "main"]


def unsafe_segments_by_condition(ds, segment_length: int = 64) -> dict:
    """{"by_condition": {"goal{u}_lambda{l}_source{s}": [unsafe, total]}, "by_goal": {u: [unsafe, total, frac]}}."""
    thr = segment_cost_threshold(ds, segment_length)
    cond: dict[str, list[int]] = {}
    goal: dict[str, list] = {}
    for s, e in ds.episode_bounds().tolist():
        c = ds["costs"][s:e]
        n = (e - s) // segment_length
        unsafe = int((c[: n * segment_length].reshape(n, segment_length).sum(1) > thr).sum()) if n else 0
        u, lam, src = int(ds["goal_ids"][s]), float(ds["penalties"][s]), int(ds["source"][s])
        for table, key in ((cond, f"goal{u}_lambda{lam:g}_source{src}"), (goal, str(u))):
            row = table.setdefault(key, [0, 0])
            row[0] += unsafe
            row[1] += int(n)
    for row in goal.values():
        row.append(round(row[0] / row[1], 4) if row[1] else None)
    return {"by_condition": dict(sorted(cond.items())), "by_goal": dict(sorted(goal.items(), key=lambda kv: int(kv[0])))}


def main(argv=None) -> int:
    p = ToolParser(prog="python -m control.segment_report", description=__doc__)
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--scale", default="small", help="data scale")
    p.add_argument("--seed", type=int, default=0, help="build seed")
    p.add_argument("--data_dir", default=None, help="dataset folder (default <cache root>/control_data)")
    p.add_argument("--segment_length", type=int, default=64, help="steps per segment")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    ds = load_dataset(dataset_path(args.task, args.scale, args.seed, args.data_dir))
    report = {
        **run_record(command=tool_command("control.segment_report", argv), task=args.task, scale=args.scale,
                     seed=args.seed, segment_length=args.segment_length),
        **unsafe_segments_by_condition(ds, args.segment_length),
    }
    print(json.dumps(redact(report), indent=1))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
