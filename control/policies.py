"""Policies for control/: a small goal- and penalty-conditioned SAC for behaviour data, and
the per-segment log-prob helpers that feed ``llm_safepref.core.losses`` (via ``control.objectives``).

Design decisions:
- Behaviour data must contain safe *and* unsafe motion for every user goal. One SAC agent
  per task is conditioned on (goal, penalty flag) and trained with hindsight relabelling:
  every sampled transition gets a random user goal and a random penalty coefficient
  lambda in {0, 10}, and its reward is recomputed from the stored features,
  ``r = reward(features, goal) - lambda * cost``. lambda = 0 learns fast, unsafe skills;
  lambda = 10 (the crowd's shared penalty) learns the safe ones.
- Everything is small and CPU-friendly (2 x 256 MLP, one torch thread in long jobs).
- ``policy_segment_logps`` returns ``S(sigma) = sum_t log pi(a_t | s_t)`` of shape (B,) for
  a batch of segments (``control.feedback.gather_segments``), the quantity every loss in
  ``llm_safepref.core.losses`` consumes; ``gaussian_segment_logps`` is the diagonal-Gaussian
  sum, ``unit_variance_segment_logps`` the CPL convention (``-||mu(s) - a||^2``: twice the
  unit-variance Gaussian log-density, up to a constant).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "mlp",
    "TanhGaussianActor",
    "SACConfig",
    "SAC",
    "gaussian_segment_logps",
    "unit_variance_segment_logps",
    "policy_segment_logps",
    "PENALTIES",
]

PENALTIES = (0.0, 10.0)  # lambda values the behaviour agent is conditioned on
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(inp: int, out: int, hidden: int = 256, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------- log-prob helpers


def gaussian_segment_logps(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Sum over a segment of diagonal-Gaussian log-densities.

    mean, log_std, actions: (B, T, A) (log_std may broadcast) -> (B,).
    ``log N(a; mu, sigma) = -0.5 ((a - mu)/sigma)^2 - log sigma - 0.5 log(2 pi)`` per dim.
    """
    if mean.shape != actions.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != actions shape {tuple(actions.shape)}")
    if mean.dim() != 3:
        raise ValueError(f"expected (B, T, A) tensors, got {mean.dim()} dims")
    log_std = log_std.expand_as(mean)
    z = (actions - mean) * torch.exp(-log_std)
    per_dim = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(dim=(1, 2))


def unit_variance_segment_logps(mean: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """CPL's control convention ``S = -sum_t ||mu(s_t) - a_t||^2`` (B, T, A) -> (B,)."""
    if mean.shape != actions.shape or mean.dim() != 3:
        raise ValueError(f"expected equal (B, T, A) shapes, got {tuple(mean.shape)} and {tuple(actions.shape)}")
    return -(mean - actions).pow(2).sum(dim=(1, 2))


def policy_segment_logps(
    policy: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    segments: Mapping[str, np.ndarray | torch.Tensor],
    *,
    log_std: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``S(sigma)`` of a batch of segments under a policy, (B,).

    ``segments``: ``observations`` (B, L, obs_dim) and ``actions`` (B, L, A) (what
    ``control.feedback.gather_segments`` returns). ``policy(obs) -> mean`` (B, L, A), or
    ``-> (mean, log_std)`` for a Gaussian head. The sum is diagonal-Gaussian with the policy's
    ``log_std`` (else the ``log_std`` given here); with neither it is the unit-variance CPL
    score. Gradients flow to the policy's parameters.
    """
    obs = torch.as_tensor(segments["observations"], dtype=dtype, device=device)
    actions = torch.as_tensor(segments["actions"], dtype=dtype, device=device)
    if obs.dim() != 3 or actions.dim() != 3 or obs.shape[:2] != actions.shape[:2]:
        raise ValueError(f"segments need observations (B, L, obs_dim) and actions (B, L, A) of the same B, L; "
                         f"got {tuple(obs.shape)} and {tuple(actions.shape)}")
    out = policy(obs)
    mean, head_log_std = out if isinstance(out, tuple) else (out, None)
    log_std = head_log_std if head_log_std is not None else log_std
    if log_std is None:
        return unit_variance_segment_logps(mean, actions)
    return gaussian_segment_logps(mean, torch.as_tensor(log_std, dtype=mean.dtype, device=mean.device), actions)


# --------------------------------------------------------------------------- SAC


class TanhGaussianActor(nn.Module):
    def __init__(self, inp: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(inp, 2 * act_dim, hidden)
        self.act_dim = act_dim

    def forward(self, x: torch.Tensor):
        mu, log_std = self.net(x).chunk(2, dim=-1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, x: torch.Tensor):
        mu, log_std = self(x)
        std = log_std.exp()
        u = mu + std * torch.randn_like(mu)
        a = torch.tanh(u)
        # log-prob with the tanh change of variables, (B,)
        logp = (-0.5 * ((u - mu) / std).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return a, logp

    @torch.no_grad()
    def act(self, x: np.ndarray, deterministic: bool, generator: torch.Generator | None = None) -> np.ndarray:
        mu, log_std = self(torch.as_tensor(x, dtype=torch.float32))
        if deterministic:
            return torch.tanh(mu).numpy().astype(np.float64)
        noise = torch.randn(mu.shape, generator=generator)
        return torch.tanh(mu + log_std.exp() * noise).numpy().astype(np.float64)


@dataclass
class SACConfig:
    hidden: int = field(default=256, metadata={"help": "Width of the 2-layer MLPs."})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate (actor, critics, temperature)."})
    gamma: float = field(default=0.99, metadata={"help": "Discount."})
    tau: float = field(default=0.005, metadata={"help": "Polyak rate of the target critics."})
    batch_size: int = field(default=256, metadata={"help": "Transitions per update."})
    init_alpha: float = field(default=0.2, metadata={"help": "Initial entropy temperature."})

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.batch_size < 1 or self.hidden < 1:
            raise ValueError("batch_size and hidden must be positive")


class SAC:
    """Soft actor-critic (Haarnoja et al., 2018) with twin critics and auto temperature.

    Input to every network: ``[obs, goal, lambda / 10]`` (the conditioning is appended).
    """

    def __init__(self, obs_dim: int, cond_dim: int, act_dim: int, cfg: SACConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        inp = obs_dim + cond_dim
        self.actor = TanhGaussianActor(inp, act_dim, cfg.hidden)
        self.q1, self.q2 = mlp(inp + act_dim, 1, cfg.hidden), mlp(inp + act_dim, 1, cfg.hidden)
        self.q1_t, self.q2_t = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.log_alpha = torch.tensor(math.log(cfg.init_alpha), requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.opt_q = torch.optim.Adam(list(self.q1.parameters()) + list(self.q2.parameters()), lr=cfg.lr)
        self.opt_alpha = torch.optim.Adam([self.log_alpha], lr=cfg.lr)

    def update(self, x, a, r, x2, not_done) -> dict[str, float]:
        """One gradient step. x, x2: (B, inp); a: (B, A); r, not_done: (B,)."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = self.actor.sample(x2)
            xa2 = torch.cat([x2, a2], -1)
            q_t = torch.min(self.q1_t(xa2), self.q2_t(xa2)).squeeze(-1) - alpha * logp2
            target = r + self.cfg.gamma * not_done * q_t
        xa = torch.cat([x, a], -1)
        q_loss = F.mse_loss(self.q1(xa).squeeze(-1), target) + F.mse_loss(self.q2(xa).squeeze(-1), target)
        self.opt_q.zero_grad()
        q_loss.backward()
        self.opt_q.step()

        a_pi, logp = self.actor.sample(x)
        xa_pi = torch.cat([x, a_pi], -1)
        q_pi = torch.min(self.q1(xa_pi), self.q2(xa_pi)).squeeze(-1)
        actor_loss = (alpha * logp - q_pi).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()

        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.opt_alpha.zero_grad()
        alpha_loss.backward()
        self.opt_alpha.step()

        with torch.no_grad():
            for net, tgt in ((self.q1, self.q1_t), (self.q2, self.q2_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1 - self.cfg.tau).add_(self.cfg.tau * p)
        return {"q_loss": q_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item()}
