"""PRESA on control (Gong, Varakantham, Kumar, AAMAS 2026): CPL preferences + a Lagrangian on safety labels.

Design decisions (the math: ``docs/methods.md``, "PRESA"; the objective: ``control.objectives``):

- Feedback: PRESA's synthetic feedback (``control.feedback.make_presa_feedback``: pairs
  preferred by the cumulative reward of one goal, cost ignored, and a per-segment safety label
  ``cost <= kappa L / T``) for goals of the downstream grid, the pairs split evenly over the
  goals (:func:`presa_feedback_for_goals`). Each pair keeps its goal; the policy is
  ``pi(a | s, g)`` (``GoalConditionedPolicy``) and scores a pair's segments under that goal.
- Per-segment sums ``S(sigma) = -sum_t ||mu(s_t, g) - a_t||^2`` (B,) come from
  ``control.policies.policy_segment_logps`` (CPL's unit-variance convention), and the loss is
  ``control.objectives.PresaSegmentObjective``: ``cpl_loss`` on ``S - S_ref`` (CPL-KL),
  ``safety_prob`` on ``[chosen; rejected]``, ``presa_lagrangian`` with the core
  ``LagrangeMultiplier``'s nu, moved once per step on the batch's mean ``p(y | sigma)``.
- The reference ``pi_ref`` is the behaviour-cloning policy frozen after a BC warm-up (as
  TraC, the authors' earlier code): the first ``bc_warmup_steps`` steps maximise ``S`` of both
  segments of each pair; then ``pi_ref`` is copied from the policy and the optimiser is reset.
- CPL-only (``control.learners.cpl``) is this learner with ``safety_term=False``: the same
  feedback, warm-up and preference loss, no safety term and no multiplier (the safety
  probabilities are still logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from control.data import Dataset
from control.feedback import PresaFeedbackConfig, gather_segments, make_presa_feedback, segment_cost_threshold
from control.learners.base import (GoalConditionedPolicy, Learner, LearnerConfig, dataset_obs_stats, goal_scale,
                                   train_goals)
from control.objectives import PresaControlConfig, PresaSegmentObjective
from control.policies import policy_segment_logps
from llm_safepref.core.schema import CHOSEN, CHOSEN_IS_SAFE, REJECTED, REJECTED_IS_SAFE, Metric

__all__ = ["PresaLearnerConfig", "PresaLearner", "presa_feedback_for_goals", "config_for"]


@dataclass
class PresaLearnerConfig(LearnerConfig):
    """PRESA's learner: feedback size, BC warm-up, and the objective (``PresaControlConfig``)."""

    n_pairs: int = field(default=5000, metadata={"help": "PRESA feedback pairs, split evenly over the "
                                                         "downstream goals."})
    segment_length: int = field(default=64, metadata={"help": "Steps per segment."})
    label_noise: float = field(default=0.0, metadata={"help": "Flip probability of the preference labels."})
    feedback_beta: float | None = field(default=None, metadata={"help": "Boltzmann rationality of the labeller; "
                                                                        "None = argmax labels."})
    bc_warmup_steps: int = field(default=30, metadata={"help": "BC steps before pi_ref is frozen (TraC: 30% of "
                                                               "the steps)."})
    safety_term: bool = field(default=True, metadata={"help": "False: CPL-only, the preference-only ablation."})
    objective: PresaControlConfig = field(default_factory=PresaControlConfig,
                                          metadata={"help": "PRESA's loss and multiplier (PresaConfig's names)."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.objective, dict):  # from a checkpoint's or a run file's JSON
            self.objective = PresaControlConfig(**self.objective)
        if self.n_pairs < 1 or self.segment_length < 1:
            raise ValueError(f"n_pairs and segment_length must be >= 1, got {self.n_pairs}, {self.segment_length}")
        if not 0 <= self.bc_warmup_steps < self.steps:
            raise ValueError(f"bc_warmup_steps must lie in [0, steps={self.steps}), got {self.bc_warmup_steps}")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")


def config_for(task: str, scale: str, **kw) -> PresaLearnerConfig:
    """Per-scale defaults. smoke: seconds; small: the validation run's budget (docs/control.md); paper: TraC's 100k steps, batch 96."""
    if scale == "smoke":
        base = dict(steps=40, bc_warmup_steps=15, batch_size=16, hidden=32, n_pairs=64, segment_length=16,
                    eval_goals=2, eval_episodes=1, eval_n_envs=1, log_every=5, checkpoint_every=10)
    elif scale == "small":
        base = dict(steps=1_500, bc_warmup_steps=500, batch_size=64, hidden=256, n_pairs=5_000,
                    segment_length=16 if task == "reach" else 64, eval_goals=8, eval_episodes=2,
                    log_every=50, checkpoint_every=500, validate_every=150)
    elif scale == "paper":
        base = dict(steps=100_000, bc_warmup_steps=30_000, batch_size=96, hidden=256, n_pairs=20_000,
                    segment_length=16 if task == "reach" else 64, eval_goals=38, eval_episodes=10, eval_n_envs=4,
                    log_every=500, checkpoint_every=5_000, validate_every=5_000)
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: smoke, small, paper")
    base.update(kw)
    return PresaLearnerConfig(**base)


def presa_feedback_for_goals(ds: Dataset, goals: np.ndarray, cfg: PresaLearnerConfig, seed: int
                             ) -> dict[str, np.ndarray]:
    """PRESA feedback for every goal of ``goals`` (G, goal_dim), ``n_pairs`` split evenly over them.

    ``make_presa_feedback`` labels by the reward of a user goal (a column of ``rewards``); here
    it sees the dataset with that column relabelled for each goal of the grid (a broadcast
    view, nothing copied), so the labelling rule and the safety threshold are the module's own.
    Returns its columns concatenated plus ``goal`` (P, goal_dim).
    """
    n_goals = len(goals)
    # kappa L / T, scaled by the threshold arm's factor (None: the feedback module's own default).
    threshold = (None if cfg.cost_threshold_scale == 1.0
                 else segment_cost_threshold(ds, cfg.segment_length) * cfg.cost_threshold_scale)
    counts = np.full(n_goals, cfg.n_pairs // n_goals)
    counts[: cfg.n_pairs % n_goals] += 1
    parts = []
    for gi, (goal, n) in enumerate(zip(goals, counts)):
        if n == 0:
            continue
        r = ds.reward_for(goal)  # (N,) reward of this goal
        view = Dataset({**ds.arrays, "rewards": np.broadcast_to(r[:, None], ds["rewards"].shape)}, ds.meta)
        fb = make_presa_feedback(view, PresaFeedbackConfig(
            n_pairs=int(n), segment_length=cfg.segment_length, goal_id=0, beta=cfg.feedback_beta,
            label_noise=cfg.label_noise, seed=seed * 100_003 + gi, cost_threshold=threshold))
        fb["goal"] = np.broadcast_to(goal, (int(n), len(goal))).copy()
        parts.append(fb)
    keys = [k for k in parts[0] if np.ndim(parts[0][k]) >= 1]
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    out["segment_length"] = np.array(cfg.segment_length)
    out["cost_threshold"] = parts[0]["cost_threshold"]
    return out


class PresaLearner(Learner):
    """PRESA (or CPL-only, ``safety_term=False``) on segment pairs; see the module docstring."""

    method = "presa"

    def __init__(self, config: PresaLearnerConfig, ds: Dataset, seed: int):
        super().__init__(config, ds, seed)
        spec = self.spec
        obs_dim, act_dim = ds["observations"].shape[1], ds["actions"].shape[1]
        mean, std = dataset_obs_stats(ds)
        make = lambda: GoalConditionedPolicy(obs_dim, spec.goal_dim, act_dim, config.hidden, config.layers,  # noqa: E731
                                             mean, std, goal_scale(spec))
        self.pi, self.pi_ref = make(), make()
        self.pi_ref.load_state_dict(self.pi.state_dict())
        self.pi_ref.requires_grad_(False)
        self.modules = {"policy": self.pi, "reference": self.pi_ref}
        self.optimizers = {"policy": torch.optim.Adam(self.pi.parameters(), lr=config.lr)}
        self.objective = PresaSegmentObjective(config.objective)
        if config.safety_term:
            self.multiplier = self.objective.multiplier
        self.feedback = presa_feedback_for_goals(ds, train_goals(spec), config, seed)

    def info(self) -> dict:
        fb = self.feedback
        safe = np.concatenate([fb[CHOSEN_IS_SAFE], fb[REJECTED_IS_SAFE]])
        return {"n_pairs": int(len(fb[CHOSEN])), "n_goals": int(len(np.unique(fb["goal"], axis=0))),
                "segment_cost_threshold": float(fb["cost_threshold"]), "frac_safe_segments": float(safe.mean()),
                "safety_term": bool(self.config.safety_term)}

    def policy(self) -> GoalConditionedPolicy:
        return self.pi

    def _sums(self, net, starts: np.ndarray, goals: torch.Tensor) -> torch.Tensor:
        seg = gather_segments(self.ds, starts, self.config.segment_length)  # (B, L, .)
        return policy_segment_logps(lambda obs: net(obs, goals), seg)  # (B,)

    def sample_batch(self) -> tuple[np.ndarray, torch.Tensor]:
        """A step's minibatch: pair indices (B,) from this learner's ``rng`` and their goals (B, 1, goal_dim)."""
        idx = self.rng.integers(len(self.feedback[CHOSEN]), size=self.config.batch_size)
        return idx, torch.as_tensor(self.feedback["goal"][idx], dtype=torch.float32)[:, None, :]

    def bc_loss(self, s_c: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
        """BC warm-up: maximise S of both segments (unit variance: the per-step squared error); (B,) sums -> ()."""
        return -(s_c + s_r).mean() / (2 * self.config.segment_length)

    def preference_step_terms(self, s_c, s_r, r_c, r_r, idx: np.ndarray):
        """The loss of a preference step from the (B,) sums of policy and reference, and its terms."""
        fb = self.feedback
        terms = self.objective(s_c, s_r, r_c, r_r, fb[CHOSEN_IS_SAFE][idx], fb[REJECTED_IS_SAFE][idx])
        return (terms.loss if self.config.safety_term else terms.pref_losses.mean()), terms

    def preference_step_metrics(self, loss, terms, s_c, s_r, r_c, r_r, idx: np.ndarray) -> dict[str, float]:
        """After the optimiser step: the step's metrics, and nu's ascent step (PRESA) on the batch's mean p."""
        fb = self.feedback
        p = terms.safety_prob.detach()  # (2B,) over [chosen; rejected]
        safe = torch.as_tensor(np.concatenate([fb[CHOSEN_IS_SAFE][idx], fb[REJECTED_IS_SAFE][idx]]))
        metrics = {
            Metric.LOSS: loss.item(),
            Metric.PREFERENCE_LOSS: terms.pref_losses.mean().item(),
            Metric.PROB_MEAN: p.mean().item(),
            Metric.FRAC_SAFE: safe.float().mean().item(),
            Metric.REWARDS_ACCURACY: ((s_c - r_c) > (s_r - r_r)).float().mean().item(),
        }
        if safe.any():  # a batch without safe (unsafe) segments has no such mean: the key is left out
            metrics[Metric.PROB_SAFE] = p[safe].mean().item()
        if (~safe).any():
            metrics[Metric.PROB_UNSAFE] = p[~safe].mean().item()
        if self.config.safety_term:
            metrics[Metric.CONSTRAINT] = self.objective.multiplier.constraint(p.mean())
            metrics[Metric.NU] = self.objective.update_multiplier(p)
        return metrics

    def train_step(self, step: int) -> dict[str, float]:
        cfg, fb = self.config, self.feedback
        idx, goals = self.sample_batch()
        opt = self.optimizers["policy"]
        if step < cfg.bc_warmup_steps:
            loss = self.bc_loss(self._sums(self.pi, fb[CHOSEN][idx], goals), self._sums(self.pi, fb[REJECTED][idx], goals))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {Metric.LOSS: loss.item(), Metric.BC_LOSS: loss.item()}
        if step == cfg.bc_warmup_steps:
            # Freeze pi_ref = the BC policy; a fresh optimiser for the preference phase (TraC).
            self.pi_ref.load_state_dict(self.pi.state_dict())
            opt = self.optimizers["policy"] = torch.optim.Adam(self.pi.parameters(), lr=cfg.lr)
        s_c = self._sums(self.pi, fb[CHOSEN][idx], goals)
        s_r = self._sums(self.pi, fb[REJECTED][idx], goals)
        with torch.no_grad():
            r_c = self._sums(self.pi_ref, fb[CHOSEN][idx], goals)
            r_r = self._sums(self.pi_ref, fb[REJECTED][idx], goals)
        loss, terms = self.preference_step_terms(s_c, s_r, r_c, r_r, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return self.preference_step_metrics(loss, terms, s_c, s_r, r_c, r_r, idx)
