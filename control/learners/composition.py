"""What Safe-CPL and Safe-VPL share: the crowd's context sets, z-conditioned TD3+BC, and stage 2 (composition).

Lin & Brown (ICML 2026): stage 1 learns skills ``pi_low(a | s, z)`` from crowd preferences,
``z`` a latent user inferred from that user's annotated pairs; stage 2 freezes ``pi_low`` and
learns, for the downstream tasks, which ``z`` to use. The math (KL, reparameterisation,
prior, stage-2 penalty) is ``llm_safepref.core.latent``'s; this module is control's plumbing.

Design decisions:

- **Context sets.** The crowd is ``control.feedback.make_crowd_feedback`` (``default_crowd_config``
  sizes: segments of 64 steps, 16 pairs per query set; Reach 16 and 32; the labels are the
  *return* ``sum r_u - 10 sum c`` of the labelling user, not the advantage). A query set is
  one user's context set. Each pair is shown to the encoder as the issue asks, its two
  *observation* sequences and its label, no actions: per segment the time-mean of the
  normalised observations and their change over the segment (last minus first: the direction
  of motion, which the time-mean of a position misses), ``[f(first), f(second), y]``
  (D = 4 obs_dim + 1), ``y = 1`` when the first is preferred. Which segment comes first is a
  fixed coin flip per pair (seeded by the run's seed), so the label is not the order.
  Query sets are split 90/10 into training and held-out sets (the authors' split, as RC's
  reward model).
- **Encoder and prior.** ``PairSetEncoder(D, latent_dim=4)`` and a learned ``GaussianPrior``;
  ``z ~ q`` by ``reparameterize`` with the learner's generator; the KL weight (1e-3) follows
  ``CyclicKLSchedule`` (4 cycles over the stage-1 steps).
- **Stage 2.** ``pi_low``, the encoder and the prior are frozen. A goal-conditioned
  high-level policy ``u = tanh(MLP([(s - m)/sd, g/goal_scale]))``, ``eps = 3 u`` in
  ``[-3, 3]^d``, ``z = mu_prior + sigma_prior * eps`` (``GaussianPrior.compose``), is trained
  offline by TD3+BC on the downstream task reward minus ``w * prior_penalty(eps)`` (w = 1;
  the core's ``||eps||^2``, charged to the transition's labelled ``eps``, so the critic learns
  it). TD3+BC works in the unit box ``u = eps / 3`` so that its hyper-parameters (smoothing
  noise 0.2, clip 0.5, BC weight) mean what they mean for actions.
- **Offline eps labels.** Every dataset row gets the eps of the encoder's posterior of *its
  segment*: the episode is cut into windows of the crowd's segment length (a tail shorter
  than that belongs to the last full window; an episode shorter than a segment is one
  window), and each window is encoded as the context set of a user who prefers it over
  ``set_size`` random segments of the data (fixed by the run's seed); the label is
  ``clip((mu_q - mu_prior) / sigma_prior, -3, 3)`` (``GaussianPrior.to_eps``). Computed once
  from the frozen encoder when stage 2 starts (recomputed identically after a resume).
- **Goals and evaluation.** Stage 2 relabels every sampled transition for a goal of the
  downstream grid (``train_goals``), as the TD3+BC baselines do, and the composed policy
  ``a = pi_low(s, z(eps(s, g)))`` (:class:`ComposedPolicy`, a ``GoalConditionedPolicy``
  look-alike) is evaluated by ``base.evaluate_downstream`` on the same held-out goals as
  Task-only, Oracle and RC; no user goal is among them.
- **Shared encoder** (``shared_encoder=True``; the methods ``safe_cpl_shared`` and
  ``safe_vpl_shared``): the authors' arrangement. Encoder, prior and ``r(s, a, z)`` are
  Safe-VPL's VAE reward model trained *once* per (task, seed) as the ``latent_encoder``
  artefact (``control.learners.safe_vpl.LatentEncoderLearner``) and loaded, frozen, by
  :func:`load_latent_encoder`, which refuses an artefact whose crowd, latent or seed differ
  from the run's (naming the fields). The artefact also keeps the random generators' states
  at the end of its training, so a Safe-VPL run that continues from it computes exactly
  what the self-contained ``safe_vpl`` run computes after its own phase 1.
- **TD3+BC** (:func:`td3bc_update`) is ``control.learners.td3bc``'s machinery (``Critic``,
  ``twin_td_step``, ``polyak``) over any "goal" (a task goal, or a latent ``z``) and any action
  box: Safe-VPL's z-conditioned policy and both methods' stage 2 use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from control.data import Dataset
from control.feedback import default_crowd_config, make_crowd_feedback, valid_segment_starts
from control.learners.base import (GoalConditionedPolicy, Learner, LearnerConfig, dataset_features, dataset_obs_stats,
                                   goal_scale, train_goals)
from control.learners.td3bc import Critic, polyak, twin_td_step
from llm_safepref.core.latent import CyclicKLSchedule, GaussianPrior, PairSetEncoder, prior_penalty
from llm_safepref.core.provenance import write_json
from llm_safepref.core.schema import CHOSEN, REJECTED, USER_ID, Metric

__all__ = ["LatentLearnerConfig", "SegmentFeaturizer", "CrowdContext", "latent_policy", "TD3BCNets",
           "td3bc_update", "ComposedPolicy", "Composition", "posterior_eps_labels", "LatentLearner",
           "latent_config_for", "ENCODER_FILE", "ENCODER_META_FILE", "ENCODER_FORMAT", "ENCODER_FIELDS",
           "save_latent_encoder", "load_latent_encoder"]

ENCODER_FILE = "latent_encoder.pt"
ENCODER_META_FILE = "latent_encoder.json"
ENCODER_FORMAT = "control-latent-encoder-1"
#: Config fields that make a latent-encoder artefact: a run that loads one must agree on all of them.
ENCODER_FIELDS = ("latent_dim", "encoder_hidden", "learned_prior", "n_query_sets", "set_size", "segment_length",
                  "label_noise", "feedback_beta", "user_weights", "heldout_fraction", "hidden", "layers")


@dataclass
class LatentLearnerConfig(LearnerConfig):
    """Fields of Safe-CPL and Safe-VPL: the crowd, the latent, the TD3+BC phases, stage 2.

    ``steps`` is every phase's together; stage 2 gets what the earlier phases leave.
    ``batch_size`` counts query sets (context sets) per stage-1 step, ``rl_batch_size``
    transitions per TD3+BC step.
    """

    stage1_steps: int = field(default=50, metadata={"help": "Stage-1 steps on the crowd (encoder + pi_low for "
                                                            "Safe-CPL, the VAE reward model for Safe-VPL)."})
    latent_dim: int = field(default=4, metadata={"help": "Size of the user latent z."})
    encoder_hidden: int = field(default=64, metadata={"help": "Width of the pair-set encoder (divisible by 4)."})
    learned_prior: bool = field(default=True, metadata={"help": "Learned Gaussian prior (the authors'); "
                                                                "False: N(0, I)."})
    kl_weight: float = field(default=1e-3, metadata={"help": "Maximum weight of KL(q || prior)."})
    kl_cycles: int = field(default=4, metadata={"help": "Cycles of the cyclic cosine KL annealing (0: constant)."})
    n_query_sets: int = field(default=2000, metadata={"help": "Crowd query sets (one labelling user each)."})
    set_size: int | None = field(default=None, metadata={"help": "Pairs per query set; None = the task's default "
                                                                 "(16; Reach 32)."})
    segment_length: int | None = field(default=None, metadata={"help": "Steps per segment; None = the task's "
                                                                        "default (64; Reach 16)."})
    label_noise: float = field(default=0.0, metadata={"help": "Flip probability of the crowd's labels."})
    feedback_beta: float | None = field(default=None, metadata={"help": "Boltzmann rationality of the crowd; None = "
                                                                        "argmax labels."})
    user_weights: list[float] | None = field(default=None, metadata={"help": "Relative frequency of each user "
                                                                             "(group imbalance); None = uniform."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Fraction of query sets held out."})
    rl_batch_size: int = field(default=256, metadata={"help": "Transitions per TD3+BC step."})
    alpha: float = field(default=2.5, metadata={"help": "TD3+BC's alpha: lambda = alpha / mean|Q|."})
    gamma: float = field(default=0.99, metadata={"help": "Discount."})
    tau: float = field(default=0.005, metadata={"help": "Polyak rate of the target networks."})
    policy_noise: float = field(default=0.2, metadata={"help": "Std of TD3's target smoothing noise (unit box)."})
    noise_clip: float = field(default=0.5, metadata={"help": "Clip of the smoothing noise."})
    policy_delay: int = field(default=2, metadata={"help": "Critic steps per actor (and target) step."})
    penalty_weight: float = field(default=1.0, metadata={"help": "Stage 2's w in r_task - w ||eps||^2."})
    eps_bound: float = field(default=3.0, metadata={"help": "Stage 2's eps lies in [-bound, bound]^d."})
    shared_encoder: bool = field(default=False, metadata={"help": "Load encoder, prior (and Safe-VPL's r(s, a, z)) "
                                                                  "frozen from the latent_encoder artefact (the "
                                                                  "authors' way) instead of training them here."})

    #: Whether configs of this class end in stage 2 (the latent-encoder artefact's does not).
    has_stage2: ClassVar[bool] = True

    def phase_steps(self) -> tuple[int, ...]:
        """Steps of the phases before stage 2 (Safe-VPL adds its policy phase)."""
        return (self.stage1_steps,)

    @property
    def stage2_start(self) -> int:
        return int(sum(self.phase_steps()))

    def __post_init__(self):
        super().__post_init__()
        if self.user_weights is not None:
            self.user_weights = [float(w) for w in self.user_weights]
        for name in ("stage1_steps", "latent_dim", "encoder_hidden", "n_query_sets", "rl_batch_size", "policy_delay"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_hidden % 4:
            raise ValueError(f"encoder_hidden must be divisible by the encoder's 4 heads, got {self.encoder_hidden}")
        if self.has_stage2 and not self.stage2_start < self.steps:
            raise ValueError(f"steps={self.steps} leaves no stage-2 step after the earlier phases' "
                             f"{self.stage2_start} ({' + '.join(map(str, self.phase_steps()))})")
        if self.kl_weight < 0 or self.kl_cycles < 0 or self.penalty_weight < 0 or self.eps_bound <= 0:
            raise ValueError("kl_weight, kl_cycles and penalty_weight must be >= 0 and eps_bound > 0")
        if not 0.0 <= self.label_noise <= 0.5 or not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"label_noise must be in [0, 0.5] and heldout_fraction in (0, 1), got "
                             f"{self.label_noise}, {self.heldout_fraction}")
        if not 0 < self.gamma < 1 or not 0 < self.tau <= 1 or self.alpha <= 0:
            raise ValueError(f"gamma in (0, 1), tau in (0, 1] and alpha > 0 are required, got "
                             f"{self.gamma}, {self.tau}, {self.alpha}")


def latent_config_for(cls, scale: str, phases: dict[str, dict[str, Any]], **kw):
    """Per-scale defaults shared by both methods; ``phases[scale]`` adds the method's step counts."""
    if scale == "smoke":
        base = dict(batch_size=4, hidden=32, encoder_hidden=32, n_query_sets=20, set_size=4, segment_length=16,
                    rl_batch_size=32, eval_goals=2, eval_episodes=1, eval_n_envs=1, log_every=5,
                    checkpoint_every=10)
    elif scale == "small":
        base = dict(batch_size=4, hidden=256, encoder_hidden=64, n_query_sets=2_000, rl_batch_size=256,
                    eval_goals=8, eval_episodes=2, log_every=100, checkpoint_every=1_000, validate_every=300,
                    tau=0.05)  # the TD3+BC baselines' small tau (control.learners.td3bc)
    elif scale == "paper":
        base = dict(batch_size=6, hidden=256, encoder_hidden=128, n_query_sets=5_000, rl_batch_size=256,
                    eval_goals=38, eval_episodes=10, eval_n_envs=4, log_every=1_000, checkpoint_every=10_000,
                    validate_every=5_000)
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: smoke, small, paper")
    base.update(phases[scale])
    base.update(kw)
    return cls(**base)


# --------------------------------------------------------------------------- context sets


class SegmentFeaturizer:
    """Per-segment observation features ``[mean_t x_t, x_last - x_first]`` (2 obs_dim,), x normalised.

    Segments are ``(start, length)`` row ranges inside one episode; the time-mean uses a
    cumulative sum over the dataset (float64), so any lengths cost the same.
    """

    def __init__(self, ds: Dataset, obs_mean: np.ndarray, obs_std: np.ndarray):
        self.x = ((ds["observations"] - obs_mean) / obs_std).astype(np.float32)  # (N, obs_dim)
        self.cum = np.concatenate([np.zeros((1, self.x.shape[1])), np.cumsum(self.x, 0, dtype=np.float64)])

    def __call__(self, starts: np.ndarray, lengths: np.ndarray | int) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.broadcast_to(np.asarray(lengths, dtype=np.int64), starts.shape)
        mean = (self.cum[starts + lengths] - self.cum[starts]) / lengths[:, None]
        delta = self.x[starts + lengths - 1] - self.x[starts]
        return np.concatenate([mean, delta], -1).astype(np.float32)  # (B, 2 obs_dim)


def pair_features(f_first: np.ndarray, f_second: np.ndarray, first_preferred: np.ndarray) -> np.ndarray:
    """``[f(first), f(second), y]`` (..., 4 obs_dim + 1); ``y = 1`` where the first is preferred."""
    y = np.asarray(first_preferred, dtype=np.float32)[..., None]
    return np.concatenate([f_first, f_second, y], -1)


class CrowdContext:
    """The crowd's query sets as context sets: (Q, K) chosen / rejected starts and (Q, K, D) features."""

    def __init__(self, ds: Dataset, cfg: LatentLearnerConfig, seed: int, featurizer: SegmentFeaturizer):
        over = {k: v for k, v in (("set_size", cfg.set_size), ("segment_length", cfg.segment_length)) if v is not None}
        self.config = default_crowd_config(
            ds.spec.name, n_query_sets=cfg.n_query_sets, label_noise=cfg.label_noise, beta=cfg.feedback_beta,
            user_weights=None if cfg.user_weights is None else tuple(cfg.user_weights), seed=seed, **over)
        fb = make_crowd_feedback(ds, self.config)
        q, k, L = self.config.n_query_sets, self.config.set_size, self.config.segment_length
        self.n_sets, self.set_size, self.segment_length, self.n_users = q, k, L, ds.spec.n_users
        self.chosen, self.rejected = fb[CHOSEN].reshape(q, k), fb[REJECTED].reshape(q, k)  # (Q, K) start rows
        self.users = fb[USER_ID].reshape(q, k)[:, 0]  # (Q,) one labeller per set
        rng = np.random.default_rng([seed, 17])  # the pairs' order: a constant of the run's data
        chosen_first = rng.random((q, k)) < 0.5
        f_c = featurizer(self.chosen.ravel(), L).reshape(q, k, -1)
        f_r = featurizer(self.rejected.ravel(), L).reshape(q, k, -1)
        first = np.where(chosen_first[..., None], f_c, f_r)
        second = np.where(chosen_first[..., None], f_r, f_c)
        self.features = torch.as_tensor(pair_features(first, second, chosen_first))  # (Q, K, D)
        n_held = max(1, int(round(cfg.heldout_fraction * q)))
        held = np.zeros(q, dtype=bool)
        held[np.random.default_rng([seed, 1]).permutation(q)[:n_held]] = True
        self.train_sets, self.heldout_sets = np.flatnonzero(~held), np.flatnonzero(held)
        if len(self.train_sets) == 0:
            raise ValueError(f"{q} query sets leave none for training after holding out {n_held}; "
                             "raise n_query_sets")

    @property
    def pair_dim(self) -> int:
        return int(self.features.shape[-1])

    def info(self) -> dict[str, Any]:
        c = self.config
        return {"n_query_sets": self.n_sets, "set_size": self.set_size, "segment_length": self.segment_length,
                "n_train_sets": int(len(self.train_sets)), "n_heldout_sets": int(len(self.heldout_sets)),
                "sets_per_user": np.bincount(self.users, minlength=self.n_users).tolist(),
                "crowd_config": {"penalty": c.penalty, "beta": c.beta, "label_noise": c.label_noise,
                                 "user_weights": None if c.user_weights is None else list(c.user_weights)}}


def latent_policy(obs_dim: int, latent_dim: int, act_dim: int, hidden: int, layers: int, obs_mean, obs_std
                  ) -> GoalConditionedPolicy:
    """``pi_low(a | s, z) = tanh(MLP([(s - m)/sd, z]))``: a ``GoalConditionedPolicy`` whose "goal" is ``z``."""
    return GoalConditionedPolicy(obs_dim, latent_dim, act_dim, hidden, layers, obs_mean, obs_std,
                                 np.ones(latent_dim, dtype=np.float32))


# --------------------------------------------------------------------------- TD3+BC over any goal and action box


class TD3BCNets:
    """Actor ``pi(s, c) in [-1, 1]^A``, twin critics ``Q(s, c, a)``, their targets and two optimisers.

    ``c`` is the conditioning (a task goal or a latent ``z``); ``prefix`` names the modules and
    optimisers inside a learner's checkpoint.
    """

    def __init__(self, prefix: str, actor: GoalConditionedPolicy, cond_dim: int, act_dim: int, cfg: LatentLearnerConfig,
                 obs_mean, obs_std, cond_scale):
        obs_dim = int(actor.obs_mean.shape[0])
        self.prefix = prefix
        self.actor = actor
        self.q1, self.q2 = (Critic(obs_dim, cond_dim, act_dim, cfg.hidden, cfg.layers, obs_mean, obs_std, cond_scale)
                            for _ in range(2))
        self.actor_t, self.q1_t, self.q2_t = (copy.deepcopy(m) for m in (self.actor, self.q1, self.q2))
        for m in (self.actor_t, self.q1_t, self.q2_t):
            m.requires_grad_(False)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.opt_critic = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=cfg.lr)

    def modules(self) -> dict[str, nn.Module]:
        p = self.prefix
        return {f"{p}actor": self.actor, f"{p}q1": self.q1, f"{p}q2": self.q2, f"{p}actor_target": self.actor_t,
                f"{p}q1_target": self.q1_t, f"{p}q2_target": self.q2_t}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {f"{self.prefix}actor": self.opt_actor, f"{self.prefix}critic": self.opt_critic}


def td3bc_update(nets: TD3BCNets, b: dict[str, torch.Tensor], step: int, cfg: LatentLearnerConfig,
                 generator: torch.Generator) -> dict[str, float]:
    """One TD3+BC step (Fujimoto & Gu 2021) on a batch ``obs, goal, act, obs2, reward, not_done`` (B, .).

    ``act`` in the unit box; ``step`` counts this phase's steps (delayed actor updates). The same
    update as ``control.learners.td3bc.TD3BCLearner.train_step``, on its ``twin_td_step``.
    """
    with torch.no_grad():
        noise = (torch.randn(b["act"].shape, generator=generator) * cfg.policy_noise).clamp(-cfg.noise_clip,
                                                                                           cfg.noise_clip)
        a2 = (nets.actor_t(b["obs2"], b["goal"]) + noise).clamp(-1, 1)
    loss_c, q_mean = twin_td_step((nets.q1, nets.q2), (nets.q1_t, nets.q2_t), b, a2, b["reward"], gamma=cfg.gamma,
                                  reduce=torch.min, optimizer=nets.opt_critic)
    metrics = {"loss/critic": loss_c, "q/mean": q_mean, Metric.LOSS: loss_c}
    if (step + 1) % cfg.policy_delay == 0:
        pi = nets.actor(b["obs"], b["goal"])
        value = nets.q1(b["obs"], b["goal"], pi)
        lam = cfg.alpha / value.abs().mean().detach().clamp(min=1e-6)
        bc = (pi - b["act"]).pow(2).sum(-1).mean()
        loss = -lam * value.mean() + bc
        nets.opt_actor.zero_grad()
        loss.backward()
        nets.opt_actor.step()
        for net, tgt in ((nets.actor, nets.actor_t), (nets.q1, nets.q1_t), (nets.q2, nets.q2_t)):
            polyak(net, tgt, cfg.tau)
        metrics.update({"loss/actor": loss.item(), Metric.BC_LOSS: bc.item()})
    return metrics


# --------------------------------------------------------------------------- stage 2


class ComposedPolicy(nn.Module):
    """``a = pi_low(s, mu_prior + sigma_prior * bound * high(s, g))``: a goal-conditioned policy.

    The same interface as ``GoalConditionedPolicy`` (``forward(obs, goal)``, ``act``), so
    ``base.evaluate_downstream`` evaluates it as it evaluates the baselines.
    """

    def __init__(self, high: GoalConditionedPolicy, low: GoalConditionedPolicy, prior: GaussianPrior, bound: float):
        super().__init__()
        self.high, self.low, self.prior, self.bound = high, low, prior, float(bound)

    def latent(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """(..., d) ``z`` the high-level policy picks."""
        return self.prior.compose(self.bound * self.high(obs, goal))

    def forward(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return self.low(obs, self.latent(obs, goal))

    @torch.no_grad()
    def act(self, obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(n, obs_dim) numpy observations and a (goal_dim,) goal -> (n, A) float64 actions."""
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        g = torch.as_tensor(np.asarray(goal), dtype=torch.float32).expand(len(o), -1)
        return self(o, g).numpy().astype(np.float64)


@torch.no_grad()
def posterior_eps_labels(ds: Dataset, encoder: PairSetEncoder, prior: GaussianPrior, featurizer: SegmentFeaturizer,
                         segment_length: int, set_size: int, bound: float, seed: int, chunk: int = 4096
                         ) -> tuple[np.ndarray, dict[str, float]]:
    """(N, d) float32 offline eps label of every row and summary statistics (module docstring).

    Window w of an episode becomes a context set of ``set_size`` pairs "w preferred over a
    random data segment"; ``eps = clip((mu_q - mu_prior) / sigma_prior, -bound, bound)``.
    """
    L = segment_length
    win_start, win_len, row_win = [], [], np.empty(ds.n, dtype=np.int64)
    for s, e in ds.episode_bounds():
        n = int(e - s)
        k = max(1, n // L)
        starts = s + L * np.arange(k) if n >= L else np.array([s])
        lens = np.full(k, L) if n >= L else np.array([n])
        first = len(win_start)
        win_start.extend(starts.tolist())
        win_len.extend(lens.tolist())
        row_win[s:e] = first + np.minimum(np.arange(n) // L, k - 1)  # the tail joins the last window
    win_start, win_len = np.asarray(win_start), np.asarray(win_len)
    W = len(win_start)
    rng = np.random.default_rng([seed, 29])
    others = valid_segment_starts(ds, L)
    other = others[rng.integers(len(others), size=(W, set_size))]  # (W, K) random segments
    window_first = rng.random((W, set_size)) < 0.5
    f_w = np.broadcast_to(featurizer(win_start, win_len)[:, None, :], (W, set_size, 2 * featurizer.x.shape[1]))
    f_o = featurizer(other.ravel(), L).reshape(W, set_size, -1)
    first = np.where(window_first[..., None], f_w, f_o)
    second = np.where(window_first[..., None], f_o, f_w)
    feats = torch.as_tensor(pair_features(first, second, window_first))  # (W, K, D): the window is preferred
    was_training = encoder.training
    encoder.eval()
    mu = torch.cat([encoder(feats[i:i + chunk])[0] for i in range(0, W, chunk)])  # (W, d)
    encoder.train(was_training)
    raw = prior.to_eps(mu)
    eps = raw.clamp(-bound, bound).numpy().astype(np.float32)
    stats = {"windows": int(W), "eps_norm_mean": float(np.linalg.norm(eps, axis=1).mean()),
             "eps_clipped_fraction": float((raw.abs() > bound).float().mean())}
    return eps[row_win], stats


class Composition:
    """Stage 2 of a latent learner: the high-level TD3+BC over eps, its offline labels, the composed policy."""

    def __init__(self, learner: "LatentLearner", low: GoalConditionedPolicy):
        cfg, spec, ds = learner.config, learner.spec, learner.ds
        self.learner, self.low, self.cfg = learner, low, cfg
        d = cfg.latent_dim
        mean, std = learner.obs_mean, learner.obs_std
        high = GoalConditionedPolicy(learner.obs_dim, spec.goal_dim, d, cfg.hidden, cfg.layers, mean, std,
                                     goal_scale(spec))
        self.nets = TD3BCNets("high_", high, spec.goal_dim, d, cfg, mean, std, goal_scale(spec))
        self.goals = train_goals(spec)
        self.features = dataset_features(ds)
        self.not_done = 1.0 - ds["terminals"].astype(np.float64)
        self.labels: np.ndarray | None = None  # (N, d) eps, made when stage 2 starts
        self.label_stats: dict[str, float] = {}

    def ensure_labels(self) -> np.ndarray:
        if self.labels is None:
            ln = self.learner
            self.labels, self.label_stats = posterior_eps_labels(
                ln.ds, ln.encoder, ln.prior, ln.featurizer, ln.crowd.segment_length, ln.crowd.set_size,
                self.cfg.eps_bound, ln.seed)
        return self.labels

    def task_rewards(self, rows: np.ndarray, goals: np.ndarray) -> np.ndarray:
        return self.learner.spec.reward({k: v[rows] for k, v in self.features.items()}, goals)

    def batch(self) -> dict[str, torch.Tensor]:
        """Transitions with a downstream goal each; action = the row's eps label in the unit box."""
        ln, cfg = self.learner, self.cfg
        labels = self.ensure_labels()
        rows = ln.rng.integers(ln.ds.n, size=cfg.rl_batch_size)
        goals = self.goals[ln.rng.integers(len(self.goals), size=cfg.rl_batch_size)]
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        eps = t(labels[rows])  # (B, d)
        penalty = prior_penalty(eps)  # (B,) ||eps||^2, the core's stage-2 regulariser
        reward = t(self.task_rewards(rows, goals)) - cfg.penalty_weight * penalty
        return {"obs": t(ln.ds["observations"][rows]), "obs2": t(ln.ds["next_observations"][rows]), "goal": t(goals),
                "act": eps / cfg.eps_bound, "reward": reward, "not_done": t(self.not_done[rows]),
                "penalty": penalty}

    def train_step(self, step: int) -> dict[str, float]:
        """``step``: this stage's step count (0 at the first stage-2 step)."""
        b = self.batch()
        metrics = td3bc_update(self.nets, b, step, self.cfg, self.learner.generator)
        metrics["composition/penalty"] = b["penalty"].mean().item()
        return metrics

    def policy(self) -> ComposedPolicy:
        return ComposedPolicy(self.nets.actor, self.low, self.learner.prior, self.cfg.eps_bound)


# --------------------------------------------------------------------------- the shared encoder artefact


def _encoder_config(cfg: LatentLearnerConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ENCODER_FIELDS}


def save_latent_encoder(out_dir: str | Path, learner: "LatentLearner", modules: dict[str, nn.Module],
                        meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``ENCODER_FILE`` (weights of ``modules``, generator states, the encoder config) and its JSON."""
    out_dir = Path(out_dir)
    payload = {"format": ENCODER_FORMAT, "task": learner.spec.name, "seed": learner.seed,
               "config": _encoder_config(learner.config), "modules": {k: m.state_dict() for k, m in modules.items()},
               "numpy_rng": learner.rng.bit_generator.state, "torch_generator": learner.generator.get_state()}
    tmp = out_dir / (ENCODER_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out_dir / ENCODER_FILE)
    meta = {"kind": "latent_encoder", "task": learner.spec.name, "seed": learner.seed, "format": ENCODER_FORMAT,
            "config": _encoder_config(learner.config), **meta}
    write_json(out_dir / ENCODER_META_FILE, meta)
    return meta


def load_latent_encoder(folder: str | Path, learner: "LatentLearner", fields=ENCODER_FIELDS) -> dict[str, Any]:
    """The artefact's payload, checked against ``learner`` (task, seed and ``fields`` of ``ENCODER_FIELDS``)."""
    path = Path(folder) / ENCODER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no latent-encoder artefact {path}; a shared-encoder run needs the latent_encoder "
                                "artefact trained first (the suite runs it before the runs that need it)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {ENCODER_FORMAT!r}")
    want = {"task": learner.spec.name, "seed": learner.seed, **{k: getattr(learner.config, k) for k in fields}}
    have = {"task": state.get("task"), "seed": state.get("seed"), **state.get("config", {})}
    diff = [k for k in want if want[k] != have.get(k)]
    if diff:
        raise ValueError(f"{path} was trained for another run: " + ", ".join(
            f"{k} (artefact {have.get(k)!r}, this run {want[k]!r})" for k in diff))
    return state


# --------------------------------------------------------------------------- the learners' base


class LatentLearner(Learner):
    """Base of Safe-CPL and Safe-VPL: data views, crowd, encoder, prior, phases, stage 2.

    Subclasses build their stage-1 networks, call :meth:`finish_init` with ``pi_low``, and
    implement :meth:`stage1_step` (and their other phases through :meth:`phase_step`).
    """

    def __init__(self, config: LatentLearnerConfig, ds: Dataset, seed: int):
        super().__init__(config, ds, seed)
        self.obs_dim, self.act_dim = ds["observations"].shape[1], ds["actions"].shape[1]
        self.obs_mean, self.obs_std = dataset_obs_stats(ds)
        self.featurizer = SegmentFeaturizer(ds, self.obs_mean, self.obs_std)
        self.crowd = CrowdContext(ds, config, seed, self.featurizer)
        self.encoder = PairSetEncoder(self.crowd.pair_dim, config.latent_dim, config.encoder_hidden)
        self.prior = GaussianPrior(config.latent_dim, learned=config.learned_prior)
        self.kl_schedule = CyclicKLSchedule(config.kl_weight, config.stage1_steps, config.kl_cycles)

    def finish_init(self, low: GoalConditionedPolicy) -> None:
        self.stage2 = Composition(self, low)
        self.modules.update({"encoder": self.encoder, "prior": self.prior, **self.stage2.nets.modules()})
        self.optimizers.update(self.stage2.nets.optimizers())

    def sample_sets(self) -> np.ndarray:
        """(batch_size,) training query sets."""
        return self.crowd.train_sets[self.rng.integers(len(self.crowd.train_sets), size=self.config.batch_size)]

    def stage1_step(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def phase_step(self, phase: int, step: int) -> dict[str, float]:
        """Phase ``phase`` (>= 1) before stage 2, at its own step ``step``; Safe-VPL's policy phase."""
        raise NotImplementedError(f"{type(self).__name__} has no phase {phase}")

    def train_step(self, step: int) -> dict[str, float]:
        start = 0
        for phase, n in enumerate(self.config.phase_steps()):
            if step < start + n:
                return self.stage1_step(step) if phase == 0 else self.phase_step(phase, step - start)
            start += n
        return self.stage2.train_step(step - start)

    def policy(self) -> ComposedPolicy:
        return self.stage2.policy()

    def can_validate(self, step: int) -> bool:
        """Only in stage 2: before it the composed policy's high level is untrained and the eps labels
        (computed once, from the frozen encoder) would be made from an encoder still learning."""
        return step > self.config.stage2_start

    def heldout_info(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        self.stage2.ensure_labels()
        with torch.no_grad():
            prior_sigma = (0.5 * self.prior.logvar).exp()
        return {"crowd": self.crowd.info(), "stage1": self.heldout_info(),
                "prior": {"mean": self.prior.mean.detach().tolist(), "sigma": prior_sigma.tolist()},
                "eps_labels": dict(self.stage2.label_stats),
                "steps": {"phases": list(self.config.phase_steps()),
                          "stage2": self.config.steps - self.config.stage2_start}}

