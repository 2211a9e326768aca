"""Offline objectives of control/ on segments; all their math is ``llm_safepref.core``'s.

Design decisions (equations in ``docs/methods.md``):

- An objective sees only per-segment log-prob sums ``S(sigma)`` of shape (B,), computed from
  segments by ``control.policies.policy_segment_logps``; the loss functions are those of
  ``llm_safepref.core.losses``, called with the same arguments as the token-level
  ``PresaTrainer`` calls them (one loss, two worlds; ``tests/control/test_losses_seam.py``
  checks that both paths give the same number). Nothing here re-implements CPL, the safety
  probability, the Lagrangian, the multiplier or the KL.
- PRESA on control (:class:`PresaSegmentObjective`): preference term ``cpl_loss`` (on
  reference-adjusted sums with ``cpl_reference``, CPL-KL) or ``dpo_loss`` per pair (B,); the
  safety term ``safety_prob`` over ``[chosen; rejected]`` (2B,) with the segments' labels
  (``chosen_is_safe`` / ``rejected_is_safe`` of ``control.feedback``); combined by
  ``presa_lagrangian`` with nu of a ``llm_safepref.core.lagrange.LagrangeMultiplier``, which
  moves once per optimiser step on the mean safety probability (:meth:`update_multiplier`).
  Its ``state_dict`` is the multiplier's, the same dict as in a token-level checkpoint.
- :class:`PresaControlConfig` spells its fields as ``PresaConfig`` does (``pref_loss``,
  ``cpl_alpha``, ``cpl_bias``, ``cpl_reference``, ``beta``, ``safety_beta``, ``safety_ref_point``,
  ``safety_delta``, ``nu_init``, ``nu_lr``, ``nu_max``) and has its defaults, so both runs read
  alike. Token-level-only options (the ``kto`` batch reference point, class weights of the
  safety mean) are not offered here.
- Safe-CPL's latent users (``llm_safepref.core.latent``): a context set of a user's segment
  pairs is encoded by ``PairSetEncoder`` into ``q(z | context)``; :func:`sample_user_latent`
  draws ``z`` with ``reparameterize`` from an explicit generator; stage 1 is CPL on
  ``z``-conditioned sums plus ``kl_weight * KL(q || p)`` to a ``GaussianPrior``
  (:func:`safe_cpl_stage1_loss`); stage 2 composes ``z = prior.compose(eps)`` and regularises
  with ``prior_penalty(eps)`` (:func:`safe_cpl_stage2_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

import numpy as np
import torch

from llm_safepref.core.lagrange import LagrangeMultiplier
from llm_safepref.core.latent import GaussianPrior, PairSetEncoder, prior_penalty, reparameterize
from llm_safepref.core.losses import cpl_loss, dpo_loss, get_preference_loss, presa_lagrangian, safety_prob

__all__ = [
    "PresaControlConfig",
    "PresaTerms",
    "PresaSegmentObjective",
    "segment_pair_features",
    "sample_user_latent",
    "safe_cpl_stage1_loss",
    "safe_cpl_stage2_loss",
]


# --------------------------------------------------------------------------- PRESA


@dataclass
class PresaControlConfig:
    pref_loss: str = field(default="cpl", metadata={"help": "Preference loss: 'cpl' or 'dpo' (core registry)."})
    cpl_alpha: float = field(default=0.1, metadata={"help": "CPL temperature alpha."})
    cpl_bias: float = field(default=1.0, metadata={"help": "CPL conservative bias lambda in (0, 1]."})
    cpl_reference: bool = field(default=True, metadata={"help": "CPL on reference-adjusted sums S - S_ref."})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta (pref_loss='dpo')."})
    safety_beta: float = field(default=0.1, metadata={"help": "Scale of the safety utility beta (S - S_ref)."})
    safety_ref_point: float = field(default=0.0, metadata={"help": "Reference point z of the safety utility (utility "
                                                                   "units; 0 = PresaConfig's unset default)."})
    safety_delta: float = field(default=0.7, metadata={"help": "Constraint level: E[p(y | sigma)] >= delta."})
    nu_init: float = field(default=1.0, metadata={"help": "Initial Lagrange multiplier nu."})
    nu_lr: float = field(default=0.5, metadata={"help": "Step size of nu's projected ascent."})
    nu_max: float = field(default=10.0, metadata={"help": "Upper bound of nu."})
    safety_gradient: str = field(default="prob", metadata={
        "help": "Policy gradient of the safety term (core presa_lagrangian): 'prob' (PRESA as written, saturates "
                "when the observed label is near-impossible) or 'log_prob' (non-saturating; same value)."})

    def __post_init__(self):
        get_preference_loss(self.pref_loss)  # ValueError listing the valid names
        if self.safety_gradient not in ("prob", "log_prob"):
            raise ValueError(f"safety_gradient must be 'prob' or 'log_prob', got {self.safety_gradient!r}")
        if self.cpl_alpha <= 0 or self.beta <= 0 or self.safety_beta <= 0:
            raise ValueError(f"cpl_alpha, beta and safety_beta must be > 0, got {self.cpl_alpha}, {self.beta}, "
                             f"{self.safety_beta}")
        if not 0 < self.cpl_bias <= 1:
            raise ValueError(f"cpl_bias (CPL's lambda) must lie in (0, 1], got {self.cpl_bias}")


class PresaTerms(NamedTuple):
    loss: torch.Tensor  # () the Lagrangian
    pref_losses: torch.Tensor  # (B,) per pair
    safety_prob: torch.Tensor  # (2B,) p(y | sigma) over [chosen; rejected]


class PresaSegmentObjective:
    """PRESA's Lagrangian on segment pairs with safety labels (see module docstring)."""

    def __init__(self, cfg: PresaControlConfig | None = None):
        self.cfg = cfg or PresaControlConfig()
        self.multiplier = LagrangeMultiplier(delta=self.cfg.safety_delta, lr=self.cfg.nu_lr, init=self.cfg.nu_init,
                                             nu_max=self.cfg.nu_max)

    def preference_losses(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                          ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
        """(B,) sums -> (B,) preference losses."""
        cfg = self.cfg
        if cfg.pref_loss == "dpo":
            return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=cfg.beta)
        if cfg.cpl_reference:
            chosen_logps, rejected_logps = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        return cpl_loss(chosen_logps, rejected_logps, alpha=cfg.cpl_alpha, bias=cfg.cpl_bias)

    def __call__(self, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                 ref_rejected_logps: torch.Tensor, chosen_is_safe, rejected_is_safe) -> PresaTerms:
        """(B,) sums and (B,) bool labels -> the Lagrangian and its terms."""
        sums = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        if len({tuple(x.shape) for x in sums}) != 1 or chosen_logps.dim() != 1:
            raise ValueError(f"expected four (B,) log-prob sums, got shapes {[tuple(x.shape) for x in sums]}")
        pref = self.preference_losses(*sums)
        logps = torch.cat([chosen_logps, rejected_logps])  # (2B,)
        ref_logps = torch.cat([ref_chosen_logps, ref_rejected_logps])
        is_safe = torch.cat([torch.as_tensor(np.asarray(labels)) for labels in (chosen_is_safe, rejected_is_safe)])
        if is_safe.shape != logps.shape:
            raise ValueError(f"safety labels of shape {tuple(is_safe.shape)} for {tuple(logps.shape)} segments")
        p = safety_prob(logps, ref_logps, is_safe.to(logps.device), beta=self.cfg.safety_beta,
                        ref_point=self.cfg.safety_ref_point)
        loss = presa_lagrangian(pref, p, self.multiplier.value, self.multiplier.delta,
                                safety_gradient=self.cfg.safety_gradient)
        return PresaTerms(loss, pref, p)

    def update_multiplier(self, safety_prob_: torch.Tensor | float) -> float:
        """One ascent step of nu on the mean safety probability of the optimiser step; returns nu."""
        if isinstance(safety_prob_, torch.Tensor):
            safety_prob_ = safety_prob_.detach().mean()
        return self.multiplier.update(safety_prob_)

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.multiplier.load_state_dict(state["multiplier"])


# --------------------------------------------------------------------------- Safe-CPL latent users


def segment_pair_features(chosen: Mapping[str, np.ndarray], rejected: Mapping[str, np.ndarray], *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Features of labelled segment pairs for ``PairSetEncoder``, ``[chosen, rejected]`` order.

    ``chosen`` / ``rejected``: ``observations`` (..., L, obs_dim) and ``actions`` (..., L, A)
    (``gather_segments`` output, optionally reshaped to (B, K, L, .) context sets) ->
    (..., 2 (obs_dim + A)): each segment's time-mean of ``[s_t, a_t]``, chosen first (the
    order carries the label).
    """
    def one(seg):
        x = np.concatenate([np.asarray(seg["observations"]), np.asarray(seg["actions"])], -1)
        return torch.as_tensor(x, dtype=dtype).mean(-2)

    return torch.cat([one(chosen), one(rejected)], -1)


def sample_user_latent(encoder: PairSetEncoder, pair_features: torch.Tensor, mask: torch.Tensor | None = None, *,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z ~ q(z | context)`` per context set: (B, K, D) features -> ``(z, mu, logvar)``, each (B, d)."""
    mu, logvar = encoder(pair_features, mask)
    return reparameterize(mu, logvar, generator=generator), mu, logvar


def safe_cpl_stage1_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, mu: torch.Tensor,
                         logvar: torch.Tensor, prior: GaussianPrior, *, alpha: float, bias: float = 1.0,
                         kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean CPL(S_z) + kl_weight * mean KL(q(z | context) || p(z))``.

    Sums (B,) of the ``z``-conditioned policy; ``mu``, ``logvar`` (B_z, d) of the context sets.
    The KL weight typically follows ``llm_safepref.core.latent.CyclicKLSchedule``.
    """
    pref = cpl_loss(chosen_logps, rejected_logps, alpha=alpha, bias=bias)  # (B,)
    kl = prior.kl(mu, logvar)  # (B_z,)
    return pref.mean() + kl_weight * kl.mean(), {"pref_losses": pref.detach(), "kl": kl.detach()}


def safe_cpl_stage2_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, eps: torch.Tensor, *,
                         alpha: float, bias: float = 1.0, penalty_weight: float) -> torch.Tensor:
    """Stage 2: ``mean CPL(S_z) + penalty_weight * mean ||eps||^2`` with ``z = prior.compose(eps)`` (B, d)."""
    return cpl_loss(chosen_logps, rejected_logps, alpha=alpha, bias=bias).mean() + \
        penalty_weight * prior_penalty(eps).mean()
