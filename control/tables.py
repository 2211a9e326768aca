"""The papers' tables and plots from the suite's run files: the Safe-CPL / Safe-VPL table and the PRESA table.

Called by ``control.suite.aggregate`` after it has formed the rows (mean ± std over seeds per
(task, method), and the ``average`` row); other tools read these files, so the field names are
the issue's:

* ``table.json`` gets ``methods`` → name → ``tasks`` → task → ``normalized_reward``,
  ``normalized_cost`` (the paper's form), ``dsrl_normalized_reward``, ``dsrl_normalized_cost``,
  each with ``_std``, and ``n_seeds``; and ``average`` with the same fields. ``paper_average``
  holds the Safe-CPL paper's average row, and ``goals`` the checks of the Safe-CPL goal.
* ``presa_table.json``: ``methods`` → ``presa``, ``cpl``, ``bc_safe``, ``td3bc_lag`` (the
  ground-truth-cost baseline, ``gt_cost_baseline``) → ``safe_fraction`` (share of the (task,
  seed, threshold) runs whose cost is within their threshold: ``C / (κ s) <= 1``),
  ``dsrl_normalized_reward`` and ``dsrl_normalized_cost`` (``C / (κ s)``, each run against its
  own threshold) with ``_std`` over those runs, ``n_runs``, and ``by_threshold``; ``thresholds``
  (the scales s of κ); ``command``. The threshold runs are the arms ``<method>_k<s>``
  (``control.learners.threshold_arm``); CPL-only reads no threshold, so its runs are judged at
  every threshold.
* PNGs: ``reward_cost_frontier.png`` (RC's ω sweep, Task-only as ω = 0, against Safe-CPL and
  Safe-VPL in the normalised reward–cost plane, with and without preference imbalance) and
  ``presa_safe_fraction.png`` (the share of safe runs at each threshold, per method).

Design decisions:

* Spreads over runs, not intervals: at the small scale a method has 6 tasks × 3 seeds; the
  ``safe_fraction_ci`` is Wilson's over those runs (``llm_safepref.core.stats``), which treats
  the runs as independent (they share data seeds, so it is optimistic).
* Missing arms are listed (``missing``), never filled in.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from control.learners import THRESHOLD_SCALES, threshold_arm
from llm_safepref.core.provenance import write_json
from llm_safepref.core.stats import mean_std, wilson_interval
from llm_safepref.core.tables import format_mean_std, format_value, markdown_table

__all__ = ["PAPER_AVERAGE", "PRESA_METHODS", "GT_COST_BASELINE", "methods_view", "safe_cpl_goals",
           "presa_table", "write_paper_outputs"]

#: The Safe-CPL paper's average row (normalised reward ↑, normalised cost ↓; reward ÷ Oracle's, cost ÷ Task-only's).
PAPER_AVERAGE = {
    "oracle": {"normalized_reward": 1.00, "normalized_cost": 0.01},
    "task_only": {"normalized_reward": 1.46, "normalized_cost": 1.00},
    "rc_0.5": {"normalized_reward": 0.82, "normalized_cost": 0.05},
    "safe_vpl": {"normalized_reward": 0.93, "normalized_cost": 0.03},
    "safe_cpl": {"normalized_reward": 0.92, "normalized_cost": 0.02},
}
#: The PRESA table's methods; the last is the ground-truth-cost baseline.
PRESA_METHODS = ("presa", "cpl", "bc_safe", "td3bc_lag")
GT_COST_BASELINE = "td3bc_lag"
_FIELDS = ("normalized_reward", "normalized_cost", "dsrl_normalized_reward", "dsrl_normalized_cost")


def methods_view(rows: list[dict]) -> dict[str, Any]:
    """``rows`` (one per (task, method) plus the ``average`` ones) as ``methods → name → tasks / average``."""
    view: dict[str, Any] = {}
    for r in rows:
        entry = view.setdefault(r["method"], {"tasks": {}})
        fields = {k: r.get(k) for f in _FIELDS for k in (f, f + "_std")}
        fields.update(n_seeds=r["n_seeds"], undertrained=r.get("undertrained"))
        if r["task"] == "average":
            entry["average"] = {**fields, "n_tasks": r.get("n_tasks")}
        else:
            entry["tasks"][r["task"]] = fields
    return view


def _avg(view: dict, method: str, field: str) -> float | None:
    return (view.get(method, {}).get("average") or {}).get(field)


def safe_cpl_goals(view: dict) -> dict[str, Any]:
    """The Safe-CPL goal on the average row: each check True / False, or None where a method did not run."""
    def check(*values, test):
        return None if any(v is None for v in values) else bool(test(*values))

    cpl_r, cpl_c = _avg(view, "safe_cpl", "normalized_reward"), _avg(view, "safe_cpl", "normalized_cost")
    rc = [(w, _avg(view, f"rc_{w}", "normalized_reward"), _avg(view, f"rc_{w}", "normalized_cost"))
          for w in ("0.25", "0.5", "0.75")]
    rc_ran = [(w, r, c) for w, r, c in rc if r is not None and c is not None]
    return {
        "safe_cpl_cost_at_most_0.05": check(cpl_c, test=lambda c: c <= 0.05),
        "safe_cpl_reward_at_least_0.85": check(cpl_r, test=lambda r: r >= 0.85),
        # Unsafe in DSRL's sense: the episode cost exceeds the threshold (C / κ > 1).
        "task_only_unsafe": check(_avg(view, "task_only", "dsrl_normalized_cost"), test=lambda c: c > 1.0),
        # No RC weight reaches Safe-CPL's point or beyond (at least its reward at no more than its cost).
        "rc_worse_than_safe_cpl_on_frontier": None if cpl_r is None or cpl_c is None or not rc_ran else
        not any(r >= cpl_r and c <= cpl_c for _, r, c in rc_ran),
        "rc_degrades_under_imbalance": check(_avg(view, "rc_0.5_imbalanced", "normalized_cost"),
                                             _avg(view, "rc_0.5", "normalized_cost"), test=lambda a, b: a > b),
        "safe_cpl_imbalanced_cost_at_most_0.05": check(_avg(view, "safe_cpl_imbalanced", "normalized_cost"),
                                                       test=lambda c: c <= 0.05),
    }


def presa_table(by: dict[tuple[str, str, int], dict], *, command: str | None) -> dict[str, Any]:
    """The PRESA table from the run records ``by[(task, method, seed)]`` (see the module docstring)."""
    methods: dict[str, Any] = {}
    missing = []
    tasks = sorted({t for t, _, _ in by})
    seeds = sorted({s for _, _, s in by})
    for base in PRESA_METHODS:
        runs = []  # (task, seed, scale, reward, cost at its threshold)
        per_threshold: dict[str, list] = {}
        for scale in THRESHOLD_SCALES:
            name = base if base == "cpl" else threshold_arm(base, scale)
            found = [(t, s, r) for (t, m, s), r in by.items() if m == name]
            if not found:
                missing.append(name if base != "cpl" else f"cpl (threshold {scale:g})")
            for t, s, r in found:
                m = r["metrics"]
                run = (t, s, scale, m["eval/normalized_reward"], m["eval/normalized_cost"] / scale)
                runs.append(run)
                per_threshold.setdefault(f"{scale:g}", []).append(run)
        if not runs:
            continue

        def summary(rs: list) -> dict[str, Any]:
            safe = [c <= 1.0 for *_, c in rs]
            lo, hi = wilson_interval(sum(safe), len(safe))
            rew, cost = mean_std([x[3] for x in rs]), mean_std([x[4] for x in rs])
            return {"safe_fraction": sum(safe) / len(safe), "safe_fraction_ci": [lo, hi],
                    "dsrl_normalized_reward": rew["mean"], "dsrl_normalized_reward_std": rew["std"],
                    "dsrl_normalized_cost": cost["mean"], "dsrl_normalized_cost_std": cost["std"],
                    "n_runs": len(rs), "n_tasks": len({x[0] for x in rs}), "n_seeds": len({x[1] for x in rs})}

        methods[base] = {**summary(runs), "by_threshold": {k: summary(v) for k, v in per_threshold.items()}}
    p, gt, bc = methods.get("presa"), methods.get(GT_COST_BASELINE), methods.get("bc_safe")
    goals = {
        "presa_safe_at_least_as_often_as_gt_cost_baseline":
            None if p is None or gt is None else p["safe_fraction"] >= gt["safe_fraction"],
        "presa_reward_above_bc_safe":
            None if p is None or bc is None else p["dsrl_normalized_reward"] > bc["dsrl_normalized_reward"],
    }
    return {"format": "control-presa-table-1", "methods": methods, "gt_cost_baseline": GT_COST_BASELINE,
            "thresholds": list(THRESHOLD_SCALES), "threshold_meaning": "cost threshold = kappa x each value; a run "
            "is safe when its mean episode cost C <= kappa x value", "tasks": tasks, "seeds": seeds,
            "goals": goals, "missing": missing, "command": command}


def _presa_markdown(t: dict) -> str:
    rows = []
    for name, m in t["methods"].items():
        label = f"{name} (ground-truth cost)" if name == t["gt_cost_baseline"] else name
        by = m["by_threshold"]
        rows.append([label, f"{m['safe_fraction']:.3f} [{m['safe_fraction_ci'][0]:.2f}, {m['safe_fraction_ci'][1]:.2f}]",
                     *(format_value(by[f"{s:g}"]["safe_fraction"]) if f"{s:g}" in by else "—" for s in t["thresholds"]),
                     format_mean_std(m["dsrl_normalized_reward"], m["dsrl_normalized_reward_std"]),
                     format_mean_std(m["dsrl_normalized_cost"], m["dsrl_normalized_cost_std"]), m["n_runs"]])
    headers = ["method", "safe fraction [95 %]", *(f"safe at κ×{s:g}" for s in t["thresholds"]),
               "DSRL reward", "DSRL cost (÷ own threshold)", "runs"]
    goals = "\n".join(f"- {k}: {v}" for k, v in t["goals"].items())
    miss = ", ".join(t["missing"]) or "none"
    return (f"# PRESA table\n\nRuns: (task, seed, threshold) over tasks {', '.join(t['tasks'])} and seeds "
            f"{', '.join(map(str, t['seeds']))}; a run is safe when C ≤ κ × threshold.\n\n"
            + markdown_table(headers, rows, align=["l"] + ["r"] * (len(headers) - 1))
            + f"\n\nGoals:\n{goals}\n\nMissing arms: {miss}.\n\nCommand: `{t['command']}`\n")


def _paper_markdown(view: dict) -> str:
    rows = []
    for name, paper in PAPER_AVERAGE.items():
        ours = view.get(name, {}).get("average") or {}
        rows.append([name, format_mean_std(ours.get("normalized_reward"), ours.get("normalized_reward_std")),
                     format_value(paper["normalized_reward"]),
                     format_mean_std(ours.get("normalized_cost"), ours.get("normalized_cost_std")),
                     format_value(paper["normalized_cost"])])
    return ("\n## Average row against the paper\n\nNormalised reward (÷ Oracle's) ↑ and cost (÷ Task-only's) ↓; "
            "ours divides by max(Task-only's cost, κ), so Task-only's own cost is below 1 where it is safe on some "
            "(task, seed); the paper's figures are its average over its tasks at its scale.\n\n"
            + markdown_table(["method", "reward (ours)", "reward (paper)", "cost (ours)", "cost (paper)"], rows,
                             align=["l", "r", "r", "r", "r"]) + "\n")


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, *, legend_size: int) -> bool:
    """Labels, grid, legend; save at 120 dpi and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_frontier(view: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(name):
        a = (view.get(name) or {}).get("average") or {}
        r, c = a.get("normalized_reward"), a.get("normalized_cost")
        return None if r is None or c is None or not (math.isfinite(r) and math.isfinite(c)) else (c, r)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    drew = False
    for suffix, style, label in (("", "-o", "balanced crowd"), ("_imbalanced", "--s", "imbalanced crowd")):
        names = (["task_only"] if not suffix else []) + [f"rc_{w}{suffix}" for w in ("0.25", "0.5", "0.75")]
        pts = [(n, point(n)) for n in names]
        pts = [(n, p) for n, p in pts if p is not None]
        if pts:
            ax.plot([p[0] for _, p in pts], [p[1] for _, p in pts], style, color="tab:gray",
                    label=f"RC ω sweep ({label})")
            for n, p in pts:
                ax.annotate(n.replace("_imbalanced", " imb."), p, fontsize=7, xytext=(3, 3), textcoords="offset points")
            drew = True
        for method, color in (("safe_cpl", "tab:blue"), ("safe_vpl", "tab:orange"), ("oracle", "tab:green")):
            if suffix and method == "oracle":
                continue
            p = point(method + suffix)
            if p is not None:
                ax.plot(*p, "*" if not suffix else "P", color=color, markersize=12,
                        label=f"{method}{' (imbalanced)' if suffix else ''}", markerfacecolor=color if not suffix else "none")
                drew = True
    if not drew:
        plt.close(fig)
        return False
    return _finish(fig, ax, path, "normalised cost (÷ max(Task-only's, κ)) ↓", "normalised reward (÷ Oracle's) ↑",
                   "Reward–cost plane, average over tasks", legend_size=7)


def _plot_safe_fraction(t: dict, path: Path) -> bool:
    if not t["methods"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in t["methods"].items():
        xs = [s for s in t["thresholds"] if f"{s:g}" in m["by_threshold"]]
        ax.plot(xs, [m["by_threshold"][f"{s:g}"]["safe_fraction"] for s in xs], "-o",
                label=f"{name}{' (ground-truth cost)' if name == t['gt_cost_baseline'] else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(t["thresholds"], [f"κ×{s:g}" for s in t["thresholds"]])
    ax.set_ylim(-0.05, 1.05)
    return _finish(fig, ax, path, "cost threshold", "fraction of safe runs (C ≤ threshold)",
                   "PRESA: safe policies over cost thresholds", legend_size=8)


def write_paper_outputs(out: Path, table: dict, rows: list[dict], by: dict, *, command: str | None) -> dict:
    """Fill ``table`` with the issue's views, write ``presa_table.json`` / ``.md`` and the PNGs; returns the
    markdown to append to ``table.md``."""
    view = methods_view(rows)
    table["methods"] = view
    table["paper_average"] = PAPER_AVERAGE
    table["goals"] = safe_cpl_goals(view)
    pt = presa_table(by, command=command)
    write_json(out / "presa_table.json", pt)
    (out / "presa_table.md").write_text(_presa_markdown(pt))
    plots = {}
    if _plot_frontier(view, out / "reward_cost_frontier.png"):
        plots["reward_cost_frontier"] = "reward_cost_frontier.png"
    if _plot_safe_fraction(pt, out / "presa_safe_fraction.png"):
        plots["presa_safe_fraction"] = "presa_safe_fraction.png"
    table["plots"] = plots
    goals = "\n".join(f"- {k}: {v}" for k, v in table["goals"].items())
    return _paper_markdown(view) + f"\nSafe-CPL goal checks (average row):\n{goals}\n"
