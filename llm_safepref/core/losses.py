"""The loss core shared by the token-level trainers and ``control/``.

Design decisions (see ``docs/methods.md`` for the math):

* Every loss is a pure torch function of per-sequence (tokens) or per-segment
  (control) log-probability sums of shape ``(B,)``. Nothing here knows about
  tokens, states, models, devices or processes.
* Functions return *per-example* losses ``(B,)``; the caller reduces. The one
  exception is :func:`presa_lagrangian`, which is defined on batch means.
* No module state and no device moves. The one stateful object of the core, the
  Lagrange multiplier, lives in :mod:`llm_safepref.core.lagrange`; the latent-variable
  pieces (KL, prior penalty, encoder) in :mod:`llm_safepref.core.latent`.
* Losses are picked by name from :data:`LOSS_REGISTRY`; an unknown name is a
  ``ValueError`` that lists the valid names.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from llm_safepref.core.latent import gaussian_kl, prior_penalty

__all__ = [
    "cpl_loss",
    "dpo_loss",
    "safety_margin",
    "safety_loss",
    "safety_prob",
    "weighted_mean",
    "presa_lagrangian",
    "bradley_terry_loss",
    "LOSS_REGISTRY",
    "PREFERENCE_LOSSES",
    "get_loss",
    "get_preference_loss",
]


# --------------------------------------------------------------------------- preferences


def cpl_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    alpha: float,
    bias: float = 1.0,
) -> torch.Tensor:
    """Contrastive Preference Learning (Hejna et al., ICLR 2024), per example.

    ``-log sigmoid(alpha * S(chosen) - bias * alpha * S(rejected))`` with ``bias`` the
    conservative bias lambda in (0, 1]. Pass reference-adjusted sums
    (``S - S_ref``) for the CPL-KL variant. Shapes: ``(B,)`` -> ``(B,)``.
    """
    logits = alpha * chosen_logps - bias * alpha * rejected_logps
    # -log sigmoid(x) == softplus(-x), numerically stable for large |x|.
    return F.softplus(-logits)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """DPO's sigmoid loss (Rafailov et al., 2023), per example.

    ``-log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))``.
    It is CPL with ``bias = 1``, ``alpha = beta`` on reference-adjusted sums.
    """
    logits = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return F.softplus(-logits)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood of a reward model, per example.

    ``-log sigmoid(r(chosen) - r(rejected) - margin)``, with ``r`` a segment's (summed)
    reward: the loss of the reward models of RC and Safe-VPL (and of TRL's
    ``RewardTrainer``, whose ``margin`` column this ``margin`` mirrors). With rewards
    ``beta * (S - S_ref)`` it is DPO. Shapes: ``(B,)`` -> ``(B,)``.
    """
    return F.softplus(-(chosen_rewards - rejected_rewards - margin))


# --------------------------------------------------------------------------- safety labels


def _label_sign(is_safe: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # y = +1 for a safe segment, -1 for an unsafe one; accepts bool, {0,1} or {-1,+1}.
    is_safe = torch.as_tensor(is_safe, device=like.device)
    if is_safe.dtype == torch.bool:
        return is_safe.to(like.dtype) * 2 - 1
    return torch.where(is_safe > 0, 1.0, -1.0).to(like.dtype)


def safety_margin(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_safe: torch.Tensor,
    *,
    beta: float,
    ref_point: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Signed safety utility ``y * u`` with ``u = beta * (S - S_ref) - ref_point``.

    ``y = +1`` when the segment is labelled safe and ``-1`` otherwise (PRESA, eq. for
    ``p(y | sigma)``). ``ref_point`` is KTO's reference point ``z`` already scaled by
    ``beta``'s units of utility; ``0`` gives TRL's ``apo_zero_unpaired``. Pass a tensor to
    use a (detached) batch estimate.
    """
    u = beta * (logps - ref_logps) - ref_point
    return _label_sign(is_safe, u) * u


def safety_prob(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_safe: torch.Tensor,
    *,
    beta: float,
    ref_point: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Probability the policy assigns to the observed safety label: ``sigmoid(y * u)``."""
    return torch.sigmoid(safety_margin(logps, ref_logps, is_safe, beta=beta, ref_point=ref_point))


def safety_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_safe: torch.Tensor,
    *,
    beta: float,
    ref_point: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """KTO-form safety loss ``1 - sigmoid(y * u)``, per example."""
    return 1.0 - safety_prob(logps, ref_logps, is_safe, beta=beta, ref_point=ref_point)


# --------------------------------------------------------------------------- PRESA


def presa_lagrangian(
    pref_loss: torch.Tensor,
    safety_prob: torch.Tensor,
    nu: float | torch.Tensor,
    delta: float,
    weights: torch.Tensor | None = None,
    weight_total: float | torch.Tensor | None = None,
    safety_gradient: str = "prob",
) -> torch.Tensor:
    """PRESA's Lagrangian ``mean(L_pref) + nu * (delta - mean(p(y | sigma)))``, a scalar.

    ``safety_gradient`` picks the policy gradient of the safety term; the returned *value*
    is the Lagrangian above either way. ``"prob"`` (PRESA as written) differentiates
    ``-mean(p)``: its gradient in a segment's utility is ``p (1 - p)``, which vanishes once
    the policy gives the observed label a probability near 0, so a policy that has made its
    safe segments unlikely gets no push back however large nu grows (seen on control's
    Circle, docs/control.md). ``"log_prob"`` differentiates ``-mean(log p)`` instead (the
    non-saturating surrogate, as in GANs' generator loss): gradient ``1 - p``, largest where
    the label is most violated, the same sign and the same fixed point. ``safety_prob``
    must then be the probability itself (clamped from below at the float's tiny before the log).

    ``nu`` is the dual variable: it is a constant for the policy gradient (detached here),
    and is moved only by :meth:`LagrangeMultiplier.update`. ``weights`` (same shape as
    ``safety_prob``, e.g. per-class weights of safe / unsafe responses) make the constraint's
    mean a weighted one, ``sum(w p) / sum(w)``. In data-parallel training pass
    ``weight_total`` = the all-process ``sum(w)`` divided by the number of processes: the
    average of the processes' losses is then the global weighted mean (local ``sum(w)``
    differ between processes, so local normalisation would not be).
    """
    if isinstance(nu, torch.Tensor):
        nu = nu.detach()
    constraint = delta - weighted_mean(safety_prob, weights, total=weight_total)
    if safety_gradient == "log_prob":
        surrogate = -weighted_mean(safety_prob.clamp(min=torch.finfo(safety_prob.dtype).tiny).log(), weights,
                                   total=weight_total)
        constraint = constraint.detach() + (surrogate - surrogate.detach())  # value: the constraint; gradient: -log p
    elif safety_gradient != "prob":
        raise ValueError(f"unknown safety_gradient {safety_gradient!r}; valid: 'prob', 'log_prob'")
    return pref_loss.mean() + nu * constraint


def weighted_mean(x: torch.Tensor, weights: torch.Tensor | None = None,
                  total: float | torch.Tensor | None = None) -> torch.Tensor:
    """``sum(w x) / sum(w)`` (or ``/ total`` when given, detached); the plain mean without weights."""
    if weights is None:
        return x.mean()
    if weights.shape != x.shape:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not match values of shape {tuple(x.shape)}")
    weights = weights.to(x)
    if total is None:
        total = weights.sum()
    total = torch.as_tensor(total, dtype=x.dtype, device=x.device).detach()
    return (weights * x).sum() / total.clamp(min=torch.finfo(x.dtype).tiny)


# --------------------------------------------------------------------------- registry

#: Preference losses, selectable by ``PresaConfig.pref_loss`` and control configs.
PREFERENCE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cpl": cpl_loss,
    "dpo": dpo_loss,
}

#: Every loss function of this module, by name.
LOSS_REGISTRY: dict[str, Callable[..., torch.Tensor]] = {
    **PREFERENCE_LOSSES,
    "safety": safety_loss,
    "presa": presa_lagrangian,
    "bradley_terry": bradley_terry_loss,
    "gaussian_kl": gaussian_kl,
    "prior_penalty": prior_penalty,
}


def _lookup(name: str, table: Mapping[str, Callable], kind: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}") from None


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """Return the loss function registered under ``name``."""
    return _lookup(name, LOSS_REGISTRY, "loss")


def get_preference_loss(name: str) -> Callable[..., torch.Tensor]:
    """Return a preference loss (``cpl`` or ``dpo``)."""
    return _lookup(name, PREFERENCE_LOSSES, "preference loss")
