"""Safe-CPL on control (Lin & Brown, ICML 2026): latent-user CPL on the crowd, then composition (stage 2).

Design decisions (the math: ``docs/methods.md``, "Safe-CPL / Safe-VPL"; the shared plumbing:
``control.learners.composition``):

- **Stage 1** (``stage1_steps``): per step ``batch_size`` of the crowd's query sets, each one
  user's context set. The user encoder ``q(z | context)`` (the core's ``PairSetEncoder`` on
  the pairs' observation features and labels, no actions; latent size 4) gives ``mu``,
  ``logvar``; ``z ~ q`` by ``reparameterize`` with the learner's generator, one ``z`` per set,
  shared by its pairs. The latent-conditioned policy ``pi_low(a | s, z)`` scores every pair
  of the set with CPL's unit-variance sums ``S = -sum_t ||mu(s_t, z) - a_t||^2`` (B K,)
  (``control.policies.policy_segment_logps``), and the loss is
  ``control.objectives.safe_cpl_stage1_loss``: the core's ``cpl_loss`` (mean over pairs) plus
  ``kl_weight(step) * mean KL(q || prior)`` (``GaussianPrior.kl``, i.e. ``gaussian_kl``), the
  weight 1e-3 annealed by the core's ``CyclicKLSchedule`` (4 cycles).
- **Encoder: trained jointly** with ``pi_low`` by the CPL loss, in this run. The authors
  instead train encoder and prior inside Safe-VPL's reward model and freeze them for the CPL
  policy. Joint training lets the CPL loss shape the latent it conditions on, keeps Safe-CPL
  a method of its own (comparable with Safe-VPL rather than sharing its errors), and needs
  no artefact: the suite's job graph stays as it is (one artefact kind, RC's reward model).
  Nothing is trained twice: each (task, seed) has one Safe-CPL run, stage 1 and stage 2
  inside it, resumable at any step.
- **Or the authors' way** (``shared_encoder=True``, method ``safe_cpl_shared``): encoder and
  prior come frozen from the ``latent_encoder`` artefact (Safe-VPL's VAE reward model, trained
  once per (task, seed) and shared with ``safe_vpl_shared``); stage 1 then trains ``pi_low``
  alone by the same loss (the KL term is a constant of the frozen encoder, still logged).
- **Labels by return**, not advantage: the crowd's pairs are ranked by the labelling user's
  segment return ``sum r_u - 10 sum c`` (``control.feedback``); CPL is derived for
  advantage-ranked (regret) labels, and the authors relabel by advantage. Returns need no
  critic per user and are what RC and Safe-VPL see, so all three learn from the same labels.
- **No reference policy, no BC warm-up**: CPL's plain form with its conservative bias
  ``cpl_bias`` (lambda; 0.5 by default, CPL's offline setting) on the rejected segment.
- **Stage 2** (the remaining steps): ``control.learners.composition.Composition``:
  ``pi_low`` frozen; TD3+BC over ``eps in [-3, 3]^4`` on the downstream task reward minus
  ``||eps||^2``, offline eps labels from the encoder's posterior of the data's segments,
  evaluated as a goal-conditioned policy on the held-out downstream goals.
- Held-out check (``info()["stage1"]``): on the held-out query sets, with ``z = mu_q`` of
  each set, the fraction of pairs with ``S(chosen) > S(rejected)`` and the mean CPL loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from control.data import Dataset
from control.feedback import gather_segments
from control.learners.composition import (ENCODER_FIELDS, LatentLearner, LatentLearnerConfig, latent_config_for,
                                          latent_policy, load_latent_encoder)
from control.objectives import safe_cpl_stage1_loss, sample_user_latent
from control.policies import policy_segment_logps
from llm_safepref.core.losses import cpl_loss
from llm_safepref.core.schema import Metric

__all__ = ["SafeCPLConfig", "SafeCPLLearner", "config_for", "STEPS"]

#: Per scale: stage-1 steps and all steps (stage 2 = the difference).
STEPS = {"smoke": dict(stage1_steps=20, steps=40),
         "small": dict(stage1_steps=1_500, steps=4_500),
         "paper": dict(stage1_steps=100_000, steps=200_000)}


@dataclass
class SafeCPLConfig(LatentLearnerConfig):
    """Safe-CPL: the latent learners' fields plus CPL's temperature and conservative bias."""

    cpl_alpha: float = field(default=0.1, metadata={"help": "CPL temperature alpha."})
    cpl_bias: float = field(default=0.5, metadata={"help": "CPL conservative bias lambda in (0, 1]."})

    def __post_init__(self):
        super().__post_init__()
        if self.cpl_alpha <= 0 or not 0 < self.cpl_bias <= 1:
            raise ValueError(f"cpl_alpha must be > 0 and cpl_bias in (0, 1], got {self.cpl_alpha}, {self.cpl_bias}")


def config_for(task: str, scale: str, **kw) -> SafeCPLConfig:
    """smoke: seconds; small: 1.5k stage-1 steps (PRESA's) + 3k stage-2 (the TD3+BC baselines'); paper: 100k + 100k."""
    return latent_config_for(SafeCPLConfig, scale, STEPS, **kw)


class SafeCPLLearner(LatentLearner):
    """Stage 1: encoder + ``pi_low`` by CPL + KL; stage 2: composition. See the module docstring."""

    method = "safe_cpl"

    def __init__(self, config: SafeCPLConfig, ds: Dataset, seed: int, *, latent_encoder: str | None = None):
        super().__init__(config, ds, seed)
        self.pi_low = latent_policy(self.obs_dim, config.latent_dim, self.act_dim, config.hidden, config.layers,
                                    self.obs_mean, self.obs_std)
        self.modules = {"pi_low": self.pi_low}
        if config.shared_encoder != (latent_encoder is not None):
            raise ValueError("shared_encoder=True needs the latent_encoder artefact (and only then is one given); "
                             f"got shared_encoder={config.shared_encoder}, latent_encoder={latent_encoder!r}")
        self.encoder_artefact = None
        trained = [*self.pi_low.parameters(), *self.encoder.parameters(), *self.prior.parameters()]
        if latent_encoder is not None:
            # The reward net's width is no concern of Safe-CPL: only the encoder's and the crowd's fields must agree.
            state = load_latent_encoder(latent_encoder, self,
                                        fields=[f for f in ENCODER_FIELDS if f not in ("hidden", "layers")])
            for name, module in (("encoder", self.encoder), ("prior", self.prior)):
                module.load_state_dict(state["modules"][name])
                module.requires_grad_(False)
            trained = list(self.pi_low.parameters())
            self.encoder_artefact = str(latent_encoder)
        self.optimizers = {"stage1": torch.optim.Adam(trained, lr=config.lr)}
        self.finish_init(self.pi_low)

    def info(self) -> dict:
        out = super().info()
        if self.encoder_artefact is not None:
            out["latent_encoder"] = self.encoder_artefact
        return out

    def pair_sums(self, sets: np.ndarray, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B K,) CPL sums of the chosen and rejected segments of ``sets`` (B,) under ``z`` (B, d)."""
        k, L = self.crowd.set_size, self.crowd.segment_length
        zz = z.repeat_interleave(k, 0)[:, None, :]  # (B K, 1, d): a set's z for each of its pairs, every step
        sums = []
        for starts in (self.crowd.chosen[sets].ravel(), self.crowd.rejected[sets].ravel()):
            seg = gather_segments(self.ds, starts, L)  # (B K, L, .)
            sums.append(policy_segment_logps(lambda obs: self.pi_low(obs, zz), seg))
        return sums[0], sums[1]

    def stage1_terms(self, sets: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        """Everything of one stage-1 loss: z, mu, logvar (B, d), the sums (B K,), the loss and its parts."""
        cfg = self.config
        z, mu, logvar = sample_user_latent(self.encoder, self.crowd.features[sets], generator=self.generator)
        s_c, s_r = self.pair_sums(sets, z)
        weight = self.kl_schedule(step)
        loss, parts = safe_cpl_stage1_loss(s_c, s_r, mu, logvar, self.prior, alpha=cfg.cpl_alpha, bias=cfg.cpl_bias,
                                           kl_weight=weight)
        return {"z": z, "mu": mu, "logvar": logvar, "chosen": s_c, "rejected": s_r, "loss": loss,
                "pref_losses": parts["pref_losses"], "kl": parts["kl"], "kl_weight": torch.tensor(weight)}

    def stage1_step(self, step: int) -> dict[str, float]:
        t = self.stage1_terms(self.sample_sets(), step)
        opt = self.optimizers["stage1"]
        opt.zero_grad()
        t["loss"].backward()
        opt.step()
        return {Metric.LOSS: t["loss"].item(), Metric.PREFERENCE_LOSS: t["pref_losses"].mean().item(),
                Metric.LATENT_KL: t["kl"].mean().item(), Metric.KL_WEIGHT: float(t["kl_weight"]),
                Metric.REWARDS_ACCURACY: (t["chosen"] > t["rejected"]).float().mean().item()}

    @torch.no_grad()
    def heldout_info(self) -> dict:
        sets = self.crowd.heldout_sets
        mu, _ = self.encoder(self.crowd.features[sets])
        s_c, s_r = self.pair_sums(sets, mu)
        losses = cpl_loss(s_c, s_r, alpha=self.config.cpl_alpha, bias=self.config.cpl_bias)
        return {"heldout_accuracy": float((s_c > s_r).float().mean()), "heldout_cpl_loss": float(losses.mean()),
                "heldout_pairs": int(len(s_c))}
