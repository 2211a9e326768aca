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
- **One BC warm-up for PRESA, CPL-only and the threshold arms.** The warm-up reads the pairs'
  segments only, never their safety labels, the multiplier or the objective; the pairs do not
  depend on the threshold (``make_presa_feedback`` draws them before labelling). So every
  run of one (task, seed) whose config agrees outside :data:`WARMUP_FREE_FIELDS` computes the
  same warm-up, bit for bit. The suite trains it once, as the ``bc_warmup`` artefact
  (:class:`BCWarmupLearner`: the learner's state after ``bc_warmup_steps`` and its log), and
  each such run starts there (``warm_start``; the shared log lines, BC-phase validations
  included, are copied into its log). A run whose config differs in any other field, or that
  gets no artefact (``control.learners.train`` without one), trains its own warm-up; the run
  file's ``info["bc_warmup"]`` says which and why. Tested: a warm-started run equals its
  from-scratch run exactly (``tests/control/test_learners.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from control.data import Dataset
from control.feedback import PresaFeedbackConfig, gather_segments, make_presa_feedback, segment_cost_threshold
from control.learners.base import (CHECKPOINT_FORMAT, GoalConditionedPolicy, Learner, LearnerConfig, RunLog,
                                   WarmStart, config_dict, dataset_obs_stats, goal_scale, save_checkpoint,
                                   train_goals)
from control.objectives import PresaControlConfig, PresaSegmentObjective
from control.policies import policy_segment_logps
from llm_safepref.core.schema import CHOSEN, CHOSEN_IS_SAFE, REJECTED, REJECTED_IS_SAFE, Metric

__all__ = ["PresaLearnerConfig", "PresaLearner", "presa_feedback_for_goals", "config_for", "BCWarmupConfig",
           "BCWarmupLearner", "warmup_config_for", "WARMUP_FREE_FIELDS", "BC_WARMUP_FILE"]

#: Config fields the BC warm-up never reads: runs that differ only in these share one warm-up.
WARMUP_FREE_FIELDS = ("steps", "safety_term", "objective", "cost_threshold_scale", "checkpoint_every", "eval_goals",
                      "eval_episodes", "eval_n_envs")
#: The ``bc_warmup`` artefact's file: ``{"format", "method", "config", "step", "learner", "log"}``.
BC_WARMUP_FILE = "bc_warmup.pt"


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

    #: The ``bc_warmup`` artefact's config: the warm-up is all its steps.
    warmup_only: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.objective, dict):  # from a checkpoint's or a run file's JSON
            self.objective = PresaControlConfig(**self.objective)
        if self.n_pairs < 1 or self.segment_length < 1:
            raise ValueError(f"n_pairs and segment_length must be >= 1, got {self.n_pairs}, {self.segment_length}")
        if not (0 <= self.bc_warmup_steps < self.steps or (self.warmup_only and self.bc_warmup_steps == self.steps)):
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

    def __init__(self, config: PresaLearnerConfig, ds: Dataset, seed: int, bc_warmup: str | Path | None = None):
        super().__init__(config, ds, seed)
        self.bc_warmup_dir = None if bc_warmup is None else Path(bc_warmup)
        self.warm_start_info: dict[str, Any] = {"shared": False, "reason": "no bc_warmup artefact given"}
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
                "safety_term": bool(self.config.safety_term), "bc_warmup": dict(self.warm_start_info)}

    def warm_start(self) -> WarmStart | None:
        """Start after the shared BC warm-up (the module docstring) when its artefact matches this config."""
        if self.bc_warmup_dir is None:
            return None
        if self.config.bc_warmup_steps == 0:
            self.warm_start_info = {"shared": False, "reason": "bc_warmup_steps is 0"}
            return None
        path = self.bc_warmup_dir / BC_WARMUP_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no BC warm-up there; train it with train_artefact('bc_warmup', ...) "
                                    "or run this method through the suite, which does so first")
        state = torch.load(path, map_location="cpu", weights_only=False)
        diff = warmup_mismatch(state["config"], self.config)
        if diff:
            self.warm_start_info = {"shared": False, "reason": f"{path} was trained with other {', '.join(diff)}"}
            return None
        learner = state["learner"]
        for k in ("policy", "reference"):
            self.modules[k].load_state_dict(learner["modules"][k])
        self.optimizers["policy"].load_state_dict(learner["optimizers"]["policy"])
        self.rng.bit_generator.state = learner["numpy_rng"]
        self.generator.set_state(learner["torch_generator"])
        self.warm_start_info = {"shared": True, "from": str(self.bc_warmup_dir), "step": int(state["step"])}
        rows = [dict(r) for r in state["log"]]
        if self.multiplier is not None:  # as the loop logs it: nu on every training row (unmoved by the warm-up)
            for r in rows:
                if "event" not in r:
                    r.setdefault(Metric.NU, float(self.multiplier.value))
        return WarmStart(int(state["step"]), rows, str(self.bc_warmup_dir))

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


def warmup_mismatch(artefact_config: dict, config: PresaLearnerConfig) -> list[str]:
    """The fields outside :data:`WARMUP_FREE_FIELDS` in which a warm-up artefact's config differs from ``config``."""
    mine = config_dict(config)
    return sorted(k for k in set(mine) | set(artefact_config)
                  if k not in WARMUP_FREE_FIELDS and mine.get(k) != artefact_config.get(k))


@dataclass
class BCWarmupConfig(PresaLearnerConfig):
    """The ``bc_warmup`` artefact: PRESA's config with the warm-up as every step (``steps = bc_warmup_steps``)."""

    warmup_only: ClassVar[bool] = True

    def __post_init__(self):
        self.steps, self.safety_term = self.bc_warmup_steps, False
        if self.bc_warmup_steps < 1:
            raise ValueError(f"the bc_warmup artefact needs bc_warmup_steps >= 1, got {self.bc_warmup_steps}")
        super().__post_init__()


def warmup_config_for(task: str, scale: str, **kw) -> BCWarmupConfig:
    """PRESA's per-scale config as the warm-up artefact's (so that PRESA, CPL-only and the arms match it)."""
    base = config_for(task, scale, **kw)
    return BCWarmupConfig(**{f.name: getattr(base, f.name) for f in fields(base)})


class BCWarmupLearner(PresaLearner):
    """PRESA's BC warm-up alone, trained once per (task, seed) and shared (the module docstring)."""

    method = "bc_warmup"
    output_files = (BC_WARMUP_FILE,)

    def finalize(self, out_dir: str | Path) -> dict:
        """Write the state after the warm-up, its config and its log into ``BC_WARMUP_FILE``; returns its facts."""
        out_dir = Path(out_dir)
        rows = RunLog(out_dir / "log.jsonl").rows()
        save_checkpoint(out_dir / BC_WARMUP_FILE, {
            "format": CHECKPOINT_FORMAT, "method": self.method, "config": config_dict(self.config),
            "step": int(self.config.steps), "learner": self.state_dict(), "log": rows})
        return {"step": int(self.config.steps), "log_rows": len(rows), "n_rows": int(self.ds.n),
                **{k: v for k, v in self.info().items() if k not in ("bc_warmup", "safety_term")}}
