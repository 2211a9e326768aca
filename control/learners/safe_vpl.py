"""Safe-VPL on control (Lin & Brown, ICML 2026): a VAE reward model of the crowd, a z-conditioned policy, stage 2.

Design decisions (the math: ``docs/methods.md``, "Bradley–Terry reward models" and "Safe-CPL /
Safe-VPL"; the shared plumbing: ``control.learners.composition``):

- **Phase 1, VAE reward model** (``stage1_steps``; VPL, Poddar et al. 2024): per step
  ``batch_size`` query sets (one user's context set each). The encoder ``q(z | context)`` (the
  core's ``PairSetEncoder`` on the pairs' observation features and labels, no actions;
  latent size 4) and a learned ``GaussianPrior``; ``z ~ q`` by ``reparameterize`` with the
  learner's generator, one per set. The decoder is ``r(s, a, z)``, an MLP on
  ``[(s - m)/sd, a, z]``; a segment's reward is ``R = sum_t r(s_t, a_t, z)`` (B K,), and the
  loss is the core's ``bradley_terry_loss(R(chosen), R(rejected))`` (mean over pairs) plus
  ``kl_weight(step) * mean KL(q || prior)`` (``GaussianPrior.kl`` = ``gaussian_kl``; 1e-3 with
  the core's ``CyclicKLSchedule``, 4 cycles). Labels are the crowd's returns (see
  ``control.learners.safe_cpl``).
- **Phase 2, z-conditioned offline policy** (``policy_steps``): TD3+BC, the baselines'
  algorithm (``composition.td3bc_update`` on ``control.learners.td3bc``'s ``Critic`` and
  ``twin_td_step``), not IQL. Why: Task-only, Oracle, RC and the cost-Lagrangian baseline all
  learn their policies with this TD3+BC, so Safe-VPL differs from RC only in its reward
  (one ``r_hat`` vs a user-conditioned ``r(., z)``), which is the comparison the table is
  for; and TD3+BC is offline RL with an explicit behaviour constraint, the property IQL is
  used for in the authors' code (no out-of-distribution actions). Each sampled transition
  gets a ``z`` drawn from the (frozen) prior and its reward relabelled by the frozen
  ``r(s, a, z)``; actor ``pi_low(a | s, z)``, critics ``Q(s, z, a)``.
- The encoder, prior and reward model are this run's, trained once per (task, seed); no
  other method reads them (Safe-CPL trains its own encoder jointly: its module docstring
  says why), so the suite needs no artefact for them. The authors' arrangement is the option
  ``shared_encoder=True`` (methods ``safe_vpl_shared`` / ``safe_cpl_shared``): phase 1 is then
  the ``latent_encoder`` artefact (:class:`LatentEncoderLearner`: this learner stopped after
  phase 1, its config :class:`LatentEncoderConfig` with ``steps = stage1_steps``), trained once
  per (task, seed) and shared. A ``safe_vpl_shared`` run loads it (weights and the random
  generators' states) and starts at phase 2, so it computes what ``safe_vpl`` computes after
  its own phase 1, with ``stage1_steps`` fewer steps of its own.
- **Stage 2** (the remaining steps): ``control.learners.composition.Composition`` over the
  phase-2 actor, with the phase-1 encoder's posterior eps labels.
- Held-out check (``info()["stage1"]``): on the held-out query sets, with ``z = mu_q``, the
  reward model's preference accuracy ``R(chosen) > R(rejected)`` and mean Bradley–Terry loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from control.data import Dataset
from control.feedback import gather_segments
from control.learners.composition import (ENCODER_FILE, ENCODER_META_FILE, LatentLearner, LatentLearnerConfig,
                                          TD3BCNets, latent_config_for, latent_policy, load_latent_encoder,
                                          save_latent_encoder, td3bc_update)
from control.policies import mlp
from llm_safepref.core.latent import reparameterize
from llm_safepref.core.losses import bradley_terry_loss
from llm_safepref.core.schema import Metric

__all__ = ["SafeVPLConfig", "LatentRewardNet", "SafeVPLLearner", "config_for", "STEPS", "shared_config_for",
           "LatentEncoderConfig", "LatentEncoderLearner", "encoder_config_for"]

#: Per scale: reward-model steps, policy steps and all steps (stage 2 = what is left).
STEPS = {"smoke": dict(stage1_steps=20, policy_steps=20, steps=60),
         "small": dict(stage1_steps=1_000, policy_steps=3_000, steps=7_000),
         "paper": dict(stage1_steps=50_000, policy_steps=100_000, steps=250_000)}


@dataclass
class SafeVPLConfig(LatentLearnerConfig):
    """Safe-VPL: the latent learners' fields plus the z-conditioned policy phase."""

    policy_steps: int = field(default=50, metadata={"help": "TD3+BC steps of the z-conditioned policy "
                                                            "(after the reward model, before stage 2)."})

    def phase_steps(self) -> tuple[int, ...]:
        # Shared encoder: phase 1 is the latent_encoder artefact's, none of this run's steps.
        return (0 if self.shared_encoder else self.stage1_steps, self.policy_steps)

    def __post_init__(self):
        if self.policy_steps < 1:
            raise ValueError(f"SafeVPLConfig.policy_steps must be >= 1, got {self.policy_steps}")
        super().__post_init__()


def config_for(task: str, scale: str, **kw) -> SafeVPLConfig:
    """smoke: seconds; small: RC's reward-model steps (1k), then 3k + 3k TD3+BC (the baselines');
    paper: 50k + 100k + 100k."""
    return latent_config_for(SafeVPLConfig, scale, STEPS, **kw)


def shared_config_for(task: str, scale: str, **kw) -> SafeVPLConfig:
    """``safe_vpl``'s config with ``shared_encoder=True`` and ``stage1_steps`` fewer steps (the artefact's)."""
    base = config_for(task, scale)
    kw.setdefault("steps", base.steps - base.stage1_steps)
    return config_for(task, scale, shared_encoder=True, **kw)


@dataclass
class LatentEncoderConfig(SafeVPLConfig):
    """The ``latent_encoder`` artefact: Safe-VPL's phase 1 alone; ``steps`` is always ``stage1_steps``."""

    has_stage2: ClassVar[bool] = False

    def phase_steps(self) -> tuple[int, ...]:
        return (self.stage1_steps,)

    def __post_init__(self):
        self.steps = self.stage1_steps
        if self.shared_encoder:
            raise ValueError("the latent_encoder artefact trains the encoder: shared_encoder must be False")
        super().__post_init__()


def encoder_config_for(task: str, scale: str, **kw) -> LatentEncoderConfig:
    """``safe_vpl``'s per-scale config, as the artefact's (so that the shared runs agree with it by default)."""
    return latent_config_for(LatentEncoderConfig, scale, STEPS, **kw)


class LatentRewardNet(nn.Module):
    """``r(s, a, z)``: MLP on ``[(s - m)/sd, a, z]`` (..., .) -> (...)."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden: int, layers: int, obs_mean, obs_std):
        super().__init__()
        self.net = mlp(obs_dim + act_dim + latent_dim, 1, hidden, layers)
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z = z.expand(*obs.shape[:-1], z.shape[-1])
        return self.net(torch.cat([(obs - self.obs_mean) / self.obs_std, act, z], -1)).squeeze(-1)


class SafeVPLLearner(LatentLearner):
    """Phase 1: VAE reward model; phase 2: z-conditioned TD3+BC; stage 2: composition. See the module docstring."""

    method = "safe_vpl"

    def __init__(self, config: SafeVPLConfig, ds: Dataset, seed: int, *, latent_encoder: str | None = None):
        super().__init__(config, ds, seed)
        d = config.latent_dim
        self.reward = LatentRewardNet(self.obs_dim, self.act_dim, d, config.hidden, config.layers, self.obs_mean,
                                      self.obs_std)
        actor = latent_policy(self.obs_dim, d, self.act_dim, config.hidden, config.layers, self.obs_mean,
                              self.obs_std)
        self.low = TD3BCNets("low_", actor, d, self.act_dim, config, self.obs_mean, self.obs_std, np.ones(d))
        self.modules = {"reward": self.reward, **self.low.modules()}
        self.optimizers = {"reward": torch.optim.Adam([*self.reward.parameters(), *self.encoder.parameters(),
                                                       *self.prior.parameters()], lr=config.lr),
                           **self.low.optimizers()}
        self.not_done = 1.0 - ds["terminals"].astype(np.float64)
        self.finish_init(actor)
        self.encoder_artefact = None
        if config.shared_encoder != (latent_encoder is not None):
            raise ValueError("shared_encoder=True needs the latent_encoder artefact (and only then is one given); "
                             f"got shared_encoder={config.shared_encoder}, latent_encoder={latent_encoder!r}")
        if latent_encoder is not None:
            state = load_latent_encoder(latent_encoder, self)
            for name in ("encoder", "prior", "reward"):
                self.modules[name].load_state_dict(state["modules"][name])
                self.modules[name].requires_grad_(False)
            # Continue the artefact's random streams: the run then computes what safe_vpl computes after phase 1.
            self.rng.bit_generator.state = state["numpy_rng"]
            self.generator.set_state(state["torch_generator"])
            self.encoder_artefact = str(latent_encoder)

    def info(self) -> dict:
        out = super().info()
        if self.encoder_artefact is not None:
            out["latent_encoder"] = self.encoder_artefact
        return out

    # -- phase 1
    def segment_rewards(self, starts: np.ndarray, z: torch.Tensor) -> torch.Tensor:
        """(B,) ``sum_t r(s_t, a_t, z)`` of the segments starting at ``starts`` (B,), ``z`` (B, d)."""
        seg = gather_segments(self.ds, starts, self.crowd.segment_length)
        obs = torch.as_tensor(seg["observations"], dtype=torch.float32)
        act = torch.as_tensor(seg["actions"], dtype=torch.float32)
        return self.reward(obs, act, z[:, None, :]).sum(-1)

    def pair_rewards(self, sets: np.ndarray, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B K,) segment rewards of the chosen and rejected segments of ``sets`` (B,) under ``z`` (B, d)."""
        zz = z.repeat_interleave(self.crowd.set_size, 0)  # (B K, d)
        return (self.segment_rewards(self.crowd.chosen[sets].ravel(), zz),
                self.segment_rewards(self.crowd.rejected[sets].ravel(), zz))

    def stage1_terms(self, sets: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        """One phase-1 loss: z, mu, logvar (B, d), segment rewards (B K,), the loss and its parts."""
        mu, logvar = self.encoder(self.crowd.features[sets])
        z = reparameterize(mu, logvar, generator=self.generator)
        r_c, r_r = self.pair_rewards(sets, z)
        pref = bradley_terry_loss(r_c, r_r)  # (B K,)
        kl = self.prior.kl(mu, logvar)  # (B,)
        weight = self.kl_schedule(step)
        loss = pref.mean() + weight * kl.mean()
        return {"z": z, "mu": mu, "logvar": logvar, "chosen": r_c, "rejected": r_r, "loss": loss,
                "pref_losses": pref.detach(), "kl": kl.detach(), "kl_weight": torch.tensor(weight)}

    def stage1_step(self, step: int) -> dict[str, float]:
        t = self.stage1_terms(self.sample_sets(), step)
        opt = self.optimizers["reward"]
        opt.zero_grad()
        t["loss"].backward()
        opt.step()
        return {Metric.LOSS: t["loss"].item(), Metric.PREFERENCE_LOSS: t["pref_losses"].mean().item(),
                Metric.LATENT_KL: t["kl"].mean().item(), Metric.KL_WEIGHT: float(t["kl_weight"]),
                Metric.REWARDS_ACCURACY: (t["chosen"] > t["rejected"]).float().mean().item(),
                Metric.REWARDS_MARGIN: (t["chosen"] - t["rejected"]).mean().item()}

    # -- phase 2
    @torch.no_grad()
    def policy_batch(self) -> dict[str, torch.Tensor]:
        """Transitions with ``z`` from the prior (B, d) and the reward ``r(s, a, z)`` of the frozen model."""
        cfg = self.config
        rows = self.rng.integers(self.ds.n, size=cfg.rl_batch_size)
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        prior_mu = self.prior.mean.detach().expand(len(rows), -1)
        prior_logvar = self.prior.logvar.detach().expand(len(rows), -1)
        z = reparameterize(prior_mu, prior_logvar, generator=self.generator)
        obs, act = t(self.ds["observations"][rows]), t(self.ds["actions"][rows])
        return {"obs": obs, "act": act, "obs2": t(self.ds["next_observations"][rows]), "goal": z,
                "reward": self.reward(obs, act, z), "not_done": t(self.not_done[rows])}

    def phase_step(self, phase: int, step: int) -> dict[str, float]:
        if phase != 1:
            return super().phase_step(phase, step)
        b = self.policy_batch()
        metrics = td3bc_update(self.low, b, step, self.config, self.generator)
        metrics["rewards/relabelled_mean"] = b["reward"].mean().item()
        return metrics

    @torch.no_grad()
    def heldout_info(self) -> dict:
        sets = self.crowd.heldout_sets
        mu, _ = self.encoder(self.crowd.features[sets])
        r_c, r_r = self.pair_rewards(sets, mu)
        return {"heldout_accuracy": float((r_c > r_r).float().mean()),
                "heldout_bt_loss": float(bradley_terry_loss(r_c, r_r).mean()), "heldout_pairs": int(len(r_c))}


class LatentEncoderLearner(SafeVPLLearner):
    """The ``latent_encoder`` artefact: Safe-VPL's phase 1 (encoder, prior, ``r(s, a, z)``), then :meth:`finalize`."""

    method = "latent_encoder"
    #: What :meth:`finalize` writes into the artefact folder (the suite checks them all).
    output_files = (ENCODER_FILE, ENCODER_META_FILE)

    def can_validate(self, step: int) -> bool:
        return False  # no policy yet

    def finalize(self, out_dir: str | Path) -> dict:
        """Write the frozen encoder, prior and reward model with the generators' states; returns the JSON."""
        return save_latent_encoder(out_dir, self, {k: self.modules[k] for k in ("encoder", "prior", "reward")},
                                   {"n_rows": int(self.ds.n), **self.heldout_info(), "crowd": self.crowd.info()})
