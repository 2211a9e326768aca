"""Diagnose a Safe-CPL / Safe-VPL run: are the stage-1 skills bad, or does stage 2 pick badly?

Loads a finished latent run's checkpoint (the suite's work folder) and evaluates, on the run's
*validation* goals (held-out downstream goals that are not the final table's, so nothing here is
read off the evaluation goals; ``--goals eval`` for those), with the final evaluation's episodes:

- ``composed``: the run's composed policy (stage 2's high level choosing eps per state and goal);
- ``prior_mean``: ``pi_low`` at ``z = mu_prior`` (eps = 0), one skill for every goal;
- ``user_<u>``: ``pi_low`` at the posterior mean of each crowd user's held-out context sets
  (the skills the crowd taught);
- ``best_fixed_eps``: per goal, the best of ``--samples`` fixed prior draws eps ~ N(0, I)
  (chosen on one separate episode per goal, then evaluated: a reference for a
  state-independent choice of z that ignores the stage-2 penalty).

Also written: the mean per-step task reward of the data (on these goals) against each picked
sample's stage-2 penalty ``w ||eps||^2``, the scale that decides what stage 2 can afford.

Usage (from the repository root):

    python scripts/diagnose_composition.py --task circle --method safe_cpl --seed 1 \
        --work ~/.cache/llm_safepref/control_suite/control_small-0fee6fc9f7 --out results/control_small_probes/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from control.learners import default_config, get_method, load_task_dataset  # noqa: E402
from control.learners.base import eval_goals, evaluate_downstream, validation_goals  # noqa: E402
from llm_safepref.core.provenance import run_record, write_json  # noqa: E402


class FixedLatent(torch.nn.Module):
    """A goal-conditioned look-alike: ``pi_low(s, z)`` with one fixed ``z`` (per goal when a dict)."""

    def __init__(self, low, z):
        super().__init__()
        self.low, self.z = low, z

    @torch.no_grad()
    def act(self, obs, goal):
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        z = self.z[tuple(np.round(np.asarray(goal, dtype=np.float64), 6))] if isinstance(self.z, dict) else self.z
        return self.low(o, z.expand(len(o), -1)).numpy().astype(np.float64)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--method", default="safe_cpl")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--scale", default="small")
    p.add_argument("--work", required=True, help="the suite's work folder (holds runs/<task>__<method>__seed<s>/)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--goals", choices=["validation", "eval"], default="validation")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    spec = get_method(a.method)
    config = default_config(a.method, a.task, a.scale)
    ds = load_task_dataset(a.task, a.scale)
    learner = spec.learner(config, ds, a.seed)
    ckpt = Path(a.work).expanduser() / "runs" / f"{a.task}__{a.method}__seed{a.seed}" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if int(state["step"]) != config.steps:
        raise SystemExit(f"{ckpt} is at step {state['step']}, not the run's end {config.steps}")
    learner.load_state_dict(state["learner"])
    learner.stage2.ensure_labels()
    for m in learner.modules.values():
        m.eval()
    low, prior = learner.stage2.low, learner.prior

    goal_set = (validation_goals(learner.spec, config.validate_goals, config.eval_goals) if a.goals == "validation"
                else eval_goals(learner.spec, config.eval_goals))

    def score(policy, goals=goal_set, seed=a.seed, episodes=None) -> dict:
        res = evaluate_downstream(policy, ds, config, seed, goals=goals, episodes=episodes)
        return {"dsrl_normalized_reward": res["metrics"]["eval/normalized_reward"],
                "dsrl_normalized_cost": res["metrics"]["eval/normalized_cost"],
                "per_goal_reward": [round(g["normalized_reward"], 4) for g in res["per_goal"]]}

    out = {"task": a.task, "method": a.method, "seed": a.seed, "checkpoint": str(ckpt), "goals": a.goals,
           "goal_values": np.asarray(goal_set).tolist(), "penalty_weight": config.penalty_weight, "rows": {}}
    out["rows"]["composed"] = score(learner.policy())
    with torch.no_grad():
        out["rows"]["prior_mean"] = score(FixedLatent(low, prior.mean.detach()[None]))
        crowd = learner.crowd
        for u in range(crowd.n_users):
            sets = [i for i in crowd.heldout_sets if crowd.users[i] == u]
            if not sets:
                continue
            mu, _ = learner.encoder(crowd.features[sets])
            out["rows"][f"user_{u}"] = score(FixedLatent(low, mu.mean(0, keepdim=True)))
        gen = torch.Generator().manual_seed(a.seed)
        eps = torch.randn(a.samples, prior.mean.numel(), generator=gen).clamp(-config.eps_bound, config.eps_bound)
        zs = prior.compose(eps)
        best, picked = {}, []
        for g in goal_set:
            vals = [score(FixedLatent(low, z[None]), goals=g[None], seed=a.seed + 777, episodes=1)
                    ["dsrl_normalized_reward"] - 0.0 for z in zs]
            k = int(np.argmax(vals))
            best[tuple(np.round(np.asarray(g, dtype=np.float64), 6))] = zs[k][None]
            picked.append({"goal": np.asarray(g).tolist(), "sample": k, "eps_norm2": float((eps[k] ** 2).sum()),
                           "selection_reward": vals[k]})
        out["rows"]["best_fixed_eps"] = {**score(FixedLatent(low, best)), "picked": picked}
    out["eps_labels"] = dict(learner.stage2.label_stats)
    rows = np.random.default_rng(a.seed).integers(ds.n, size=20_000)
    goal_rows = goal_set[np.random.default_rng(a.seed + 1).integers(len(goal_set), size=len(rows))]
    r = learner.stage2.task_rewards(rows, goal_rows)
    out["data_step_reward"] = {"mean": float(np.mean(r)), "std": float(np.std(r))}
    out.update(run_record(command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])))
    write_json(a.out, out)
    for name, r in out["rows"].items():
        print(f"{name:16s} reward {r['dsrl_normalized_reward']:.3f}  cost {r['dsrl_normalized_cost']:.3f}")
    return out


if __name__ == "__main__":
    main()
