"""Compatibility path: the loss core now lives in :mod:`llm_safepref.core`.

``from llm_safepref.losses import cpl_loss, LagrangeMultiplier, gaussian_kl`` keeps working;
new code imports from ``llm_safepref.core`` (torch and numpy only).
"""

from llm_safepref.core.lagrange import LagrangeMultiplier, PIDLagrangeMultiplier  # noqa: F401
from llm_safepref.core.latent import gaussian_kl, prior_penalty  # noqa: F401
from llm_safepref.core.losses import *  # noqa: F401,F403
from llm_safepref.core.losses import __all__ as _loss_names

__all__ = [*_loss_names, "LagrangeMultiplier", "PIDLagrangeMultiplier", "gaussian_kl", "prior_penalty"]
