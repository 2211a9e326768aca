"""RC, reward combination (Lin & Brown's baseline): TD3+BC on ``(1 - w) r_task + w r_hat``.

Design decisions:

- ``r_hat`` is the one Bradley–Terry reward model of the crowd's pooled preferences
  (``control.learners.reward_model``), trained once per (task, seed) and shared by every
  weight ``w``; the suite trains it before the RC runs. RC reads its per-row rewards.
- Scales: ``r_hat`` is centred (the authors use ``r_hat - mean r_hat``) and, our choice,
  rescaled to the standard deviation of the task reward over the data and the downstream
  goals, so that ``w`` trades off terms of the same size whatever scale the
  Bradley–Terry fit landed on. Both statistics are fixed numbers of the data (the task
  reward's on a fixed subsample of 4,096 rows x every goal), the same for every seed.
- Methods ``rc_0.25``, ``rc_0.5``, ``rc_0.75`` are this learner with ``weight`` 0.25, 0.5, 0.75.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from control.data import Dataset
from control.learners.reward_model import load_reward_artefact
from control.learners.td3bc import TD3BCConfig, TD3BCLearner
from control.learners.td3bc import config_for as td3bc_config_for

__all__ = ["RCConfig", "RCLearner", "RC_WEIGHTS", "config_for", "task_reward_std"]

RC_WEIGHTS = (0.25, 0.5, 0.75)


@dataclass
class RCConfig(TD3BCConfig):
    """TD3+BC's config plus the weight of the learned reward."""

    weight: float = field(default=0.5, metadata={"help": "w in (1 - w) r_task + w r_hat."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"RC weight must be in [0, 1], got {self.weight}")
        if self.cost_penalty != 0:
            raise ValueError(f"RC sees no true cost: cost_penalty must be 0, got {self.cost_penalty}")


def config_for(task: str, scale: str, **kw) -> RCConfig:
    return td3bc_config_for(task, scale, cls=RCConfig, **kw)


def task_reward_std(learner: TD3BCLearner, n_rows: int = 4096) -> float:
    """Std of the task reward over a fixed subsample of rows x every training goal (a data constant)."""
    rows = np.random.default_rng(0).integers(learner.ds.n, size=min(n_rows, learner.ds.n))
    r = np.concatenate([learner.task_rewards(rows, np.broadcast_to(g, (len(rows), len(g)))) for g in learner.goals])
    return float(max(r.std(), 1e-6))


class RCLearner(TD3BCLearner):
    method = "rc"

    def __init__(self, config: RCConfig, ds: Dataset, seed: int, *, reward_model: str):
        super().__init__(config, ds, seed)
        r_hat, self.reward_model_meta = load_reward_artefact(reward_model, ds.n)
        self.reward_model_dir = str(reward_model)
        self.task_std = task_reward_std(self)
        centred = r_hat.astype(np.float64) - r_hat.mean()
        self.r_hat = centred / max(float(centred.std()), 1e-6) * self.task_std  # (N,)

    def info(self) -> dict:
        return {"weight": self.config.weight, "task_reward_std": self.task_std,
                "reward_model": {"dir": self.reward_model_dir, **self.reward_model_meta}}

    def rewards(self, rows: np.ndarray, goals: np.ndarray) -> np.ndarray:
        w = self.config.weight
        return (1.0 - w) * self.task_rewards(rows, goals) + w * self.r_hat[rows]
