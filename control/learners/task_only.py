"""Task-only: goal-conditioned TD3+BC on the downstream task reward alone (Lin & Brown's baseline).

Design decision: ``control.learners.td3bc.TD3BCLearner`` with ``cost_penalty = 0``: the
policy sees no cost and no preference. It is the cost reference of the paper's table
(normalised cost = cost ÷ Task-only's).
"""

from __future__ import annotations

from control.learners.td3bc import TD3BCConfig, TD3BCLearner
from control.learners.td3bc import config_for as td3bc_config_for

__all__ = ["TaskOnlyLearner", "config_for"]


def config_for(task: str, scale: str, **kw) -> TD3BCConfig:
    kw.setdefault("cost_penalty", 0.0)
    return td3bc_config_for(task, scale, **kw)


class TaskOnlyLearner(TD3BCLearner):
    method = "task_only"

    def __init__(self, config: TD3BCConfig, ds, seed: int):
        if config.cost_penalty != 0:
            raise ValueError(f"Task-only maximises the task reward alone: cost_penalty must be 0, got "
                             f"{config.cost_penalty} (use 'oracle')")
        super().__init__(config, ds, seed)
