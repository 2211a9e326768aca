"""The latent-user math of VPL / Safe-VPL / Safe-CPL, shared by the token-level trainer and ``control/``.

Design decisions (equations in ``docs/methods.md``, "VPL" and "Safe-VPL / Safe-CPL"):

* A user is a latent ``z`` inferred from a *context set* of that user's annotated pairs by
  :class:`PairSetEncoder`, ``q(z | context) = N(mu, diag(exp(logvar)))``. The encoder sees
  one feature vector per pair, ``(B, K, D)`` with a ``(B, K)`` mask, whatever made them:
  the frozen-LM embeddings of a response pair at token level, a segment-pair encoding in
  control. The pair order carries the label (features of ``[chosen, rejected]``).
* :func:`reparameterize` takes its noise as an argument (or a generator), never from the
  global RNG, so that a trainer can draw it from per-example seeded generators and two
  processes match one.
* The prior is :class:`GaussianPrior`: learned (trainable mean and log-variance, as the
  authors' control code) or fixed standard normal.
* Stage 2 composes skills through ``z = mu_prior + sigma_prior * eps`` with the penalty
  :func:`prior_penalty` ``= ||eps||^2`` (the negative log prior density up to a constant).
* The KL weight follows :class:`CyclicKLSchedule`, cyclic cosine annealing (Fu et al., 2019;
  VPL uses it with 4 cycles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "gaussian_kl",
    "prior_penalty",
    "reparameterize",
    "compose_latent",
    "GaussianPrior",
    "PairSetEncoder",
    "CyclicKLSchedule",
    "LOGVAR_RANGE",
]

#: Clamp of encoder log-variances (the authors clamp too): exp(-10) .. exp(4).
LOGVAR_RANGE = (-10.0, 4.0)


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)))`` summed over the last dim.

    Shapes: ``(B, d)`` -> ``(B,)``; the prior broadcasts (``(d,)`` is fine). With no prior it
    is the standard normal.
    """
    if prior_mu is None:
        prior_mu = torch.zeros_like(mu)
    if prior_logvar is None:
        prior_logvar = torch.zeros_like(logvar)
    kl = 0.5 * (
        prior_logvar
        - logvar
        + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp()
        - 1.0
    )
    return kl.sum(-1)


def prior_penalty(eps: torch.Tensor) -> torch.Tensor:
    """Stage-2 regulariser of Safe-CPL: ``||eps||^2`` (negative log prior density up to a
    constant) for ``z = mu_prior + sigma_prior * eps``. Shapes: ``(B, d)`` -> ``(B,)``."""
    return (eps**2).sum(-1)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * noise`` with ``noise ~ N(0, I)``; shapes ``(B, d)``.

    Pass ``noise`` (e.g. drawn per example from seeded generators) or a ``generator``; the
    global RNG is never used, so runs are reproducible across process counts.
    """
    if noise is None:
        if generator is None:
            raise ValueError("reparameterize needs `noise` or a `generator` (the global RNG is not used)")
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=generator.device).to(mu.device)
    if noise.shape != mu.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not match mu of shape {tuple(mu.shape)}")
    return mu + (0.5 * logvar).exp() * noise


def compose_latent(eps: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor) -> torch.Tensor:
    """Stage 2's ``z = mu_prior + sigma_prior * eps``; ``eps (B, d)``, prior ``(d,)``."""
    return prior_mu + (0.5 * prior_logvar).exp() * eps


class GaussianPrior(nn.Module):
    """``p(z) = N(mean, diag(exp(logvar)))``: learned (``learned=True``) or standard normal."""

    def __init__(self, latent_dim: int, learned: bool = True):
        super().__init__()
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be > 0, got {latent_dim}")
        self.latent_dim, self.learned = latent_dim, learned
        mean, logvar = torch.zeros(latent_dim), torch.zeros(latent_dim)
        if learned:
            self.mean, self.logvar = nn.Parameter(mean), nn.Parameter(logvar)
        else:
            self.register_buffer("mean", mean)
            self.register_buffer("logvar", logvar)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL(q || p)`` per example, ``(B,)``."""
        return gaussian_kl(mu, logvar, self.mean, self.logvar)

    def compose(self, eps: torch.Tensor) -> torch.Tensor:
        return compose_latent(eps, self.mean, self.logvar)

    def to_eps(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`compose`: ``(z - mean) / sigma``."""
        return (z - self.mean) / (0.5 * self.logvar).exp()


class PairSetEncoder(nn.Module):
    """``q(z | context set)`` over pair features ``(B, K, D)`` with a ``(B, K)`` mask.

    Per pair an MLP, then one self-attention layer over the pairs of the set (padding
    masked), a masked mean, and heads for ``mu`` and ``logvar`` (clamped to
    :data:`LOGVAR_RANGE`). This is VPL's language-model encoder; the authors' control encoder
    adds attention over time inside a pair, which ``control/`` does before calling this.
    """

    def __init__(self, pair_dim: int, latent_dim: int, hidden_dim: int = 256, num_heads: int = 4,
                 attention: bool = True):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by num_heads={num_heads}")
        self.pair_dim, self.latent_dim = pair_dim, latent_dim
        self.pair_mlp = nn.Sequential(nn.Linear(pair_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(hidden_dim)
        self.mu = nn.Linear(hidden_dim, latent_dim)
        self.logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, pairs: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if pairs.dim() != 3 or pairs.size(-1) != self.pair_dim:
            raise ValueError(f"expected pair features of shape (B, K, {self.pair_dim}), got {tuple(pairs.shape)}")
        B, K, _ = pairs.shape
        if mask is None:
            mask = torch.ones(B, K, dtype=torch.bool, device=pairs.device)
        mask = mask.bool()
        if mask.shape != (B, K):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the context set's (B, K) = {(B, K)}")
        if not mask.any(dim=1).all():
            raise ValueError("every context set needs at least one pair (a mask row is all False)")
        h = self.pair_mlp(pairs)  # (B, K, H)
        if self.attention is not None:
            attended, _ = self.attention(h, h, h, key_padding_mask=~mask, need_weights=False)
            h = self.norm(h + attended)
        w = mask.to(h.dtype).unsqueeze(-1)  # (B, K, 1)
        pooled = (h * w).sum(1) / w.sum(1)  # (B, H)
        return self.mu(pooled), self.logvar(pooled).clamp(*LOGVAR_RANGE)


@dataclass(frozen=True)
class CyclicKLSchedule:
    """Cyclic cosine annealing of the KL weight (Fu et al., NAACL 2019; VPL's schedule).

    ``total_steps`` are split into ``n_cycles`` cycles; in each, the weight rises from 0 to
    ``max_weight`` along a half cosine over the first ``ratio`` of the cycle and stays at
    ``max_weight`` for the rest. ``n_cycles=0`` gives a constant ``max_weight``.
    """

    max_weight: float
    total_steps: int
    n_cycles: int = 4
    ratio: float = 0.5

    def __post_init__(self):
        if self.max_weight < 0:
            raise ValueError(f"max_weight must be >= 0, got {self.max_weight}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if self.n_cycles < 0:
            raise ValueError(f"n_cycles must be >= 0, got {self.n_cycles}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio}")

    def __call__(self, step: int) -> float:
        if self.n_cycles == 0:
            return self.max_weight
        period = self.total_steps / self.n_cycles
        t = (step % period) / period  # position in the cycle, [0, 1)
        if t >= self.ratio:
            return self.max_weight
        return self.max_weight * 0.5 * (1.0 - math.cos(math.pi * t / self.ratio))
