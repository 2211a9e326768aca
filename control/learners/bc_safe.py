"""BC-safe: behaviour cloning on the segments whose ground-truth cost is within the threshold (DSRL's baseline).

Design decisions:

- The data are cut into non-overlapping windows of ``segment_length`` steps inside every
  episode (the windows of ``python -m control stats``); a window is kept when its summed
  true cost is ``<= cost_threshold`` (default ``kappa L / T``, the rule of the PRESA safety
  labels, ``control.feedback.segment_cost_threshold``). DSRL's BC-safe keeps whole
  trajectories with cost ``<= kappa``; windows keep the safe part of mixed episodes.
- Goal-conditioned like every downstream policy: a kept step is cloned under the goal its
  episode's behaviour policy pursued (``goal_ids``); goal-free rows (goal id -1) are not used.
  The policy never sees a reward: the goal it is asked to pursue at evaluation is one the
  data never pursued, and it can only interpolate.
- Loss: ``mean_t ||mu(s_t, g) - a_t||^2``, the unit-variance negative log-likelihood of
  CPL's convention (``control.policies.unit_variance_segment_logps`` per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from control.data import Dataset
from control.feedback import segment_cost_threshold, segment_sums
from control.learners.base import GoalConditionedPolicy, Learner, LearnerConfig, dataset_obs_stats, goal_scale
from control.policies import unit_variance_segment_logps
from llm_safepref.core.schema import Metric

__all__ = ["BCSafeConfig", "BCSafeLearner", "safe_rows", "config_for"]


@dataclass
class BCSafeConfig(LearnerConfig):
    """BC-safe: which steps are cloned."""

    segment_length: int = field(default=64, metadata={"help": "Window length of the safety filter."})
    cost_threshold: float | None = field(default=None, metadata={"help": "A window is kept when its summed cost is "
                                                                         "<= this; None = kappa * L / T."})

    def __post_init__(self):
        super().__post_init__()
        if self.segment_length < 1:
            raise ValueError(f"segment_length must be >= 1, got {self.segment_length}")


def config_for(task: str, scale: str, **kw) -> BCSafeConfig:
    if scale == "smoke":
        base = dict(steps=40, batch_size=32, hidden=32, segment_length=16, eval_goals=2, eval_episodes=1,
                    eval_n_envs=1, log_every=5, checkpoint_every=10)
    elif scale == "small":
        base = dict(steps=3_000, batch_size=256, hidden=256, segment_length=16 if task == "reach" else 64,
                    eval_goals=8, eval_episodes=2, log_every=100, checkpoint_every=1_000, validate_every=300)
    elif scale == "paper":
        base = dict(steps=100_000, batch_size=512, hidden=256, segment_length=16 if task == "reach" else 64,
                    eval_goals=38, eval_episodes=10, eval_n_envs=4, log_every=500, checkpoint_every=5_000,
                    validate_every=5_000)
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: smoke, small, paper")
    base.update(kw)
    return BCSafeConfig(**base)


def safe_rows(ds: Dataset, segment_length: int, cost_threshold: float | None = None) -> tuple[np.ndarray, dict]:
    """Rows of the kept windows (sorted) and counts ``{"windows", "kept_windows", "threshold"}``."""
    thr = segment_cost_threshold(ds, segment_length) if cost_threshold is None else float(cost_threshold)
    starts = [np.arange(s, e - segment_length + 1, segment_length) for s, e in ds.episode_bounds()]
    starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    goal_ok = ds["goal_ids"][starts] >= 0
    keep = starts[(segment_sums(ds["costs"], starts, segment_length) <= thr) & goal_ok]
    rows = (keep[:, None] + np.arange(segment_length)[None, :]).reshape(-1)
    return np.sort(rows), {"windows": int(goal_ok.sum()), "kept_windows": int(len(keep)), "threshold": thr}


class BCSafeLearner(Learner):
    method = "bc_safe"

    def __init__(self, config: BCSafeConfig, ds: Dataset, seed: int):
        super().__init__(config, ds, seed)
        spec = self.spec
        threshold = config.cost_threshold
        if threshold is None and config.cost_threshold_scale != 1.0:
            threshold = segment_cost_threshold(ds, config.segment_length) * config.cost_threshold_scale
        self.rows, self.counts = safe_rows(ds, config.segment_length, threshold)
        if len(self.rows) == 0:
            raise ValueError(f"{spec.name}: no {config.segment_length}-step window has cost <= "
                             f"{self.counts['threshold']:.3g}; BC-safe has nothing to clone")
        mean, std = dataset_obs_stats(ds)
        self.pi = GoalConditionedPolicy(ds["observations"].shape[1], spec.goal_dim, ds["actions"].shape[1],
                                        config.hidden, config.layers, mean, std, goal_scale(spec))
        self.modules = {"policy": self.pi}
        self.optimizers = {"policy": torch.optim.Adam(self.pi.parameters(), lr=config.lr)}

    def info(self) -> dict:
        return {**self.counts, "kept_rows": int(len(self.rows))}

    def policy(self) -> GoalConditionedPolicy:
        return self.pi

    def train_step(self, step: int) -> dict[str, float]:
        rows = self.rows[self.rng.integers(len(self.rows), size=self.config.batch_size)]
        obs = torch.as_tensor(self.ds["observations"][rows], dtype=torch.float32)[:, None, :]  # (B, 1, obs_dim)
        act = torch.as_tensor(self.ds["actions"][rows], dtype=torch.float32)[:, None, :]
        goals = torch.as_tensor(self.spec.user_goals[self.ds["goal_ids"][rows]], dtype=torch.float32)[:, None, :]
        loss = -unit_variance_segment_logps(self.pi(obs, goals), act).mean()  # one-step segments
        opt = self.optimizers["policy"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {Metric.LOSS: loss.item(), Metric.BC_LOSS: loss.item()}
