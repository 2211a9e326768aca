"""TD3+BC-Lag: an offline safe-RL baseline that sees the ground-truth cost (a BCQ-Lag-style Lagrangian on TD3+BC).

Design decisions:

- TD3+BC on the task reward (``control.learners.td3bc``) plus twin *cost* critics
  ``Q_c(s, g, a)`` trained on the true per-step cost (target ``c + gamma max(Q_c1', Q_c2')``:
  the pessimistic one of the pair, so the cost is not underestimated). The actor ascends
  ``Q_r - nu Q_c`` (with TD3+BC's ``lambda = alpha / mean|Q_r - nu Q_c|`` and its BC term).
- The constraint is the episode budget ``E[C] <= kappa`` written for discounted cost-to-go,
  as OSRL's BCQ-Lag does: ``Q_c(s, g, pi(s, g)) <= kappa (1 - gamma^T) / ((1 - gamma) T)``
  with T the dataset's episode length (``cost_budget`` None: the task's kappa).
- The multiplier is the core's: ``PIDLagrangeMultiplier`` (Stooke et al. 2020; OSRL's gains
  kp 0.1, ki 0.003, kd 0.001) by default, or ``LagrangeMultiplier.for_cost_budget`` (projected
  gradient ascent, ``multiplier="gradient"``). It moves once per actor step on the batch mean
  of ``Q_c(s, g, pi(s, g))``, and is checkpointed with the networks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from control.data import Dataset
from control.learners.td3bc import Critic, TD3BCConfig, TD3BCLearner, polyak, twin_td_step
from control.learners.td3bc import config_for as td3bc_config_for
from llm_safepref.core.lagrange import LagrangeMultiplier, PIDLagrangeMultiplier
from llm_safepref.core.schema import Metric

__all__ = ["TD3BCLagConfig", "TD3BCLagLearner", "config_for", "discounted_budget"]


@dataclass
class TD3BCLagConfig(TD3BCConfig):
    """TD3+BC's config plus the cost budget and its multiplier."""

    cost_budget: float | None = field(default=None, metadata={"help": "Episode cost budget kappa; None = the "
                                                                      "task's."})
    multiplier: str = field(default="pid", metadata={"help": "'pid' (PIDLagrangeMultiplier) or 'gradient' "
                                                             "(LagrangeMultiplier.for_cost_budget)."})
    kp: float = field(default=0.1, metadata={"help": "PID proportional gain."})
    ki: float = field(default=0.003, metadata={"help": "PID integral gain."})
    kd: float = field(default=0.001, metadata={"help": "PID derivative gain."})
    nu_lr: float = field(default=0.01, metadata={"help": "Step size of nu (multiplier='gradient')."})
    nu_max: float | None = field(default=100.0, metadata={"help": "Upper bound of nu (None: unbounded)."})

    def __post_init__(self):
        super().__post_init__()
        if self.multiplier not in ("pid", "gradient"):
            raise ValueError(f"multiplier must be 'pid' or 'gradient', got {self.multiplier!r}")
        if self.cost_budget is not None and self.cost_budget < 0:
            raise ValueError(f"cost_budget must be >= 0, got {self.cost_budget}")
        if self.cost_penalty != 0:
            raise ValueError("the Lagrangian baseline handles cost through nu: cost_penalty must be 0")


def config_for(task: str, scale: str, **kw) -> TD3BCLagConfig:
    return td3bc_config_for(task, scale, cls=TD3BCLagConfig, **kw)


def discounted_budget(kappa: float, gamma: float, horizon: int) -> float:
    """The budget of discounted cost-to-go: ``kappa (1 - gamma^T) / ((1 - gamma) T)`` (OSRL)."""
    return float(kappa * (1 - gamma ** horizon) / ((1 - gamma) * horizon))


class TD3BCLagLearner(TD3BCLearner):
    method = "td3bc_lag"

    def __init__(self, config: TD3BCLagConfig, ds: Dataset, seed: int):
        super().__init__(config, ds, seed)
        self.qc1, self.qc2 = Critic(*self._net_args), Critic(*self._net_args)
        self.qc1_t, self.qc2_t = copy.deepcopy(self.qc1), copy.deepcopy(self.qc2)
        self.modules.update({"qc1": self.qc1, "qc2": self.qc2, "qc1_target": self.qc1_t, "qc2_target": self.qc2_t})
        self.optimizers["cost_critic"] = torch.optim.Adam([*self.qc1.parameters(), *self.qc2.parameters()],
                                                          lr=config.lr)
        kappa = (self.spec.cost_threshold * config.cost_threshold_scale if config.cost_budget is None
                 else config.cost_budget)
        self.episode_budget = float(kappa)
        self.budget = discounted_budget(kappa, config.gamma, int(ds.meta["max_episode_steps"]))
        if config.multiplier == "pid":
            self.multiplier = PIDLagrangeMultiplier(delta=self.budget, init=0.0, nu_max=config.nu_max, kp=config.kp,
                                                    ki=config.ki, kd=config.kd, sense="le")
        else:
            self.multiplier = LagrangeMultiplier.for_cost_budget(self.budget, lr=config.nu_lr, nu_max=config.nu_max)

    def info(self) -> dict:
        return {"episode_cost_budget": self.episode_budget, "discounted_cost_budget": self.budget,
                "multiplier": self.config.multiplier}

    def critic_step(self, b, a2):
        metrics = super().critic_step(b, a2)
        loss, qc1_mean = twin_td_step((self.qc1, self.qc2), (self.qc1_t, self.qc2_t), b, a2, b["cost"],
                                      gamma=self.config.gamma, reduce=torch.max,
                                      optimizer=self.optimizers["cost_critic"])
        metrics.update({"loss/cost_critic": loss, "qc/mean": qc1_mean})
        return metrics

    def actor_objective(self, b, pi):
        q_r = self.q1(b["obs"], b["goal"], pi)
        q_c = torch.max(self.qc1(b["obs"], b["goal"], pi), self.qc2(b["obs"], b["goal"], pi))
        self._qc_pi = q_c.detach().mean()
        return q_r - self.multiplier.value * q_c, {"qc/policy": self._qc_pi.item()}

    def after_actor_step(self, b, pi) -> None:
        for net, tgt in ((self.qc1, self.qc1_t), (self.qc2, self.qc2_t)):
            polyak(net, tgt, self.config.tau)
        self._last_violation = self.multiplier.constraint(self._qc_pi)
        self.multiplier.update(self._qc_pi)

    def train_step(self, step: int) -> dict[str, float]:
        metrics = super().train_step(step)
        metrics[Metric.NU] = self.multiplier.value
        if "qc/policy" in metrics:
            metrics[Metric.CONSTRAINT] = self._last_violation
        return metrics
