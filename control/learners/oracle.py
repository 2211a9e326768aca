"""Oracle: goal-conditioned TD3+BC on task reward - 10 x true cost (Lin & Brown's upper reference).

Design decision: ``control.learners.td3bc.TD3BCLearner`` with ``cost_penalty = 10``, the
penalty every crowd user applies (``control.feedback.CrowdFeedbackConfig.penalty``). It sees
the ground-truth cost no other preference learner sees, and is the reward reference of the
paper's table (normalised reward = reward ÷ Oracle's).
"""

from __future__ import annotations

from control.learners.td3bc import TD3BCConfig, TD3BCLearner
from control.learners.td3bc import config_for as td3bc_config_for

__all__ = ["OracleLearner", "ORACLE_PENALTY", "config_for"]

ORACLE_PENALTY = 10.0


def config_for(task: str, scale: str, **kw) -> TD3BCConfig:
    kw.setdefault("cost_penalty", ORACLE_PENALTY)
    return td3bc_config_for(task, scale, **kw)


class OracleLearner(TD3BCLearner):
    method = "oracle"

    def __init__(self, config: TD3BCConfig, ds, seed: int):
        if config.cost_penalty <= 0:
            raise ValueError(f"Oracle penalises the true cost: cost_penalty must be > 0, got {config.cost_penalty}")
        super().__init__(config, ds, seed)
