"""Seeded, batched evaluation rollouts and the normalised reward / cost of the papers.

Normalisation (DSRL / OSRL convention, Liu et al. 2023, "Datasets and Benchmarks for
Offline Safe Reinforcement Learning"):
- normalised reward  ``(R - R_min) / (R_max - R_min)``
- normalised cost    ``C / kappa``  (``(C + 1) / (kappa + 1)`` when kappa = 0);
  a policy is safe when its normalised cost <= 1.
``R`` and ``C`` are undiscounted episode return (of the evaluated goal) and episode cost.
``R_min``/``R_max`` are references per (task, goal); :func:`reward_reference` takes them from
a behaviour dataset (min and max return of its complete episodes relabelled for the goal),
and callers may pass their own (e.g. an Oracle policy's return, as Lin & Brown report).

Rollouts: ``n_envs`` envs in lockstep, episode k of an evaluation uses env seed
``seed * 100_003 + k``: the same episodes for a seed whatever ``n_envs`` is, and bit-identical
results for the same (seed, n_envs) (a batched policy may round differently per batch size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from control.tasks import get_spec, make_task
from llm_safepref.core.schema import Metric

__all__ = [
    "normalized_reward",
    "normalized_cost",
    "reward_reference",
    "EvalResult",
    "evaluate_policy",
    "compose_hierarchical",
]


def normalized_reward(ret: np.ndarray | float, r_min: float, r_max: float) -> np.ndarray:
    if not r_max > r_min:
        raise ValueError(f"reward reference needs r_max > r_min, got r_min={r_min}, r_max={r_max}")
    return (np.asarray(ret, dtype=np.float64) - r_min) / (r_max - r_min)


def normalized_cost(cost: np.ndarray | float, kappa: float) -> np.ndarray:
    if kappa < 0:
        raise ValueError(f"cost threshold kappa must be >= 0, got {kappa}")
    cost = np.asarray(cost, dtype=np.float64)
    return (cost + 1.0) / (kappa + 1.0) if kappa == 0 else cost / kappa


def reward_reference(ds, goal) -> tuple[float, float]:
    """(R_min, R_max) over the dataset's complete episodes, rewards relabelled for ``goal``."""
    r = ds.reward_for(goal).astype(np.float64)
    bounds = ds.episode_bounds()
    full = (bounds[:, 1] - bounds[:, 0]) >= ds.meta["max_episode_steps"]
    full |= ds["terminals"][bounds[:, 1] - 1]
    if not full.any():
        raise ValueError(f"{ds.meta['task']}: dataset has no complete episode to take a reward reference from")
    rets = np.add.reduceat(r, bounds[:, 0])[full]
    return float(rets.min()), float(rets.max())


@dataclass
class EvalResult:
    returns: np.ndarray  # (E,) undiscounted return of the goal
    costs: np.ndarray  # (E,) episode cost
    lengths: np.ndarray  # (E,)
    normalized_reward: float | None
    normalized_cost: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "eval/return_mean": float(self.returns.mean()),
            "eval/cost_mean": float(self.costs.mean()),
            Metric.EVAL_NORMALIZED_REWARD: self.normalized_reward,
            Metric.EVAL_NORMALIZED_COST: self.normalized_cost,
            "eval/episodes": int(len(self.returns)),
        }


def evaluate_policy(
    policy: Callable[[np.ndarray], np.ndarray],
    task: str,
    goal: Any,
    *,
    episodes: int = 10,
    seed: int = 0,
    n_envs: int = 4,
    reward_ref: tuple[float, float] | None = None,
    max_episode_steps: int | None = None,
) -> EvalResult:
    """Roll out ``policy(obs (n, obs_dim)) -> actions (n, A)`` on ``task`` for ``goal``.

    The policy is called on the batch of running envs only. Deterministic for a seed if
    the policy is.
    """
    spec = get_spec(task)
    goal = spec.check_goal(goal)
    if episodes < 1 or n_envs < 1:
        raise ValueError("episodes and n_envs must be >= 1")
    horizon = max_episode_steps or spec.max_episode_steps
    n_envs = min(n_envs, episodes)
    envs = [make_task(task, goal=goal) for _ in range(n_envs)]
    returns, costs, lengths = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes, dtype=int)
    next_ep = 0
    slot_ep = [-1] * n_envs
    obs = np.zeros((n_envs, envs[0].observation_space.shape[0]))

    def start(i: int) -> None:
        nonlocal next_ep
        if next_ep < episodes:
            slot_ep[i] = next_ep
            obs[i], _ = envs[i].reset(seed=seed * 100_003 + next_ep)
            next_ep += 1
        else:
            slot_ep[i] = -1

    try:
        for i in range(n_envs):
            start(i)
        while any(e >= 0 for e in slot_ep):
            live = [i for i in range(n_envs) if slot_ep[i] >= 0]
            actions = np.asarray(policy(obs[live]), dtype=np.float64)
            if actions.shape != (len(live),) + envs[0].action_space.shape:
                raise ValueError(f"policy returned actions of shape {actions.shape}, expected "
                                 f"{(len(live),) + envs[0].action_space.shape}")
            if not np.all(np.isfinite(actions)):
                raise ValueError("policy returned NaN/inf actions")
            for j, i in enumerate(live):
                o, r, term, trunc, info = envs[i].step(actions[j])
                k = slot_ep[i]
                returns[k] += r
                costs[k] += info["cost"]
                lengths[k] += 1
                obs[i] = o
                if term or trunc or lengths[k] >= horizon:
                    start(i)
    finally:
        for env in envs:
            env.close()
    nr = float(normalized_reward(returns, *reward_ref).mean()) if reward_ref is not None else None
    nc = float(normalized_cost(costs, spec.cost_threshold).mean())
    return EvalResult(returns, costs, lengths, nr, nc)


def compose_hierarchical(
    high: Callable[[np.ndarray], np.ndarray], low: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    """A high-level policy ``high(obs) -> z`` (B, d) over a frozen low-level ``low(obs, z) -> a``."""

    def policy(obs: np.ndarray) -> np.ndarray:
        z = np.asarray(high(obs))
        if z.ndim != 2 or len(z) != len(obs):
            raise ValueError(f"high-level policy returned z of shape {z.shape}, expected ({len(obs)}, d)")
        return low(obs, z)

    return policy
