"""CPL-only: PRESA's preference-only ablation (no safety term, no multiplier).

Design decision: it *is* ``control.learners.presa.PresaLearner`` with ``safety_term=False``,
so the feedback, the BC warm-up, the reference and the preference loss (``cpl_loss`` on
``S - S_ref``) are PRESA's, and the only difference in a table is the safety term.
"""

from __future__ import annotations

from control.learners.presa import PresaLearner, PresaLearnerConfig
from control.learners.presa import config_for as presa_config_for

__all__ = ["CplLearner", "config_for"]


def config_for(task: str, scale: str, **kw) -> PresaLearnerConfig:
    """PRESA's per-scale defaults with the safety term off."""
    kw.setdefault("safety_term", False)
    return presa_config_for(task, scale, **kw)


class CplLearner(PresaLearner):
    """``PresaLearner`` whose config must have ``safety_term=False``."""

    method = "cpl"

    def __init__(self, config: PresaLearnerConfig, ds, seed: int, bc_warmup=None):
        if config.safety_term:
            raise ValueError("CPL-only is PRESA without its safety term: set safety_term=False (or use 'presa')")
        super().__init__(config, ds, seed, bc_warmup=bc_warmup)
