"""What every control learner shares: config base, goal-conditioned nets, the resumable loop, evaluation.

Design decisions:

- A learner is a small object with ``modules`` (name -> ``nn.Module``), ``optimizers``
  (name -> optimiser), an optional Lagrange ``multiplier`` (a core ``LagrangeMultiplier`` or
  ``PIDLagrangeMultiplier``), a numpy ``rng`` and a torch ``generator``, and one method,
  ``train_step(step) -> metrics``. :func:`run_learner` is the only training loop: it resumes
  from ``out_dir/checkpoint.pt`` when one exists, calls ``train_step`` until ``config.steps``,
  logs every ``log_every`` steps to ``out_dir/log.jsonl`` and checkpoints every
  ``checkpoint_every`` steps (and at the end).
- A checkpoint describes itself (nanoGPT style): format, method, the learner's config, the
  step, every module's and optimiser's ``state_dict``, the multiplier's ``state_dict``, and
  the states of both random generators. Restoring all of them makes a resumed run compute
  exactly what the uninterrupted run computes (single-threaded CPU torch is deterministic);
  the log is cut back to the checkpoint's step on resume, so it too equals the uninterrupted
  run's, plus one ``{"event": "resume"}`` line. A checkpoint of a different config is an
  error naming the fields that differ (delete the folder to start afresh).
- Downstream policies are goal-conditioned: input ``[(s - mean) / std, g / goal_scale]``
  (``goal_scale`` as ``control.collection.BatchCollector`` computes it), deterministic tanh
  mean. They are trained on the task's downstream goal grid (rewards relabelled from the
  stored features, ``TaskSpec.reward``) and evaluated on held-out downstream goals that are
  not user goals of the crowd (:func:`eval_goals`).
- Evaluation (:func:`evaluate_downstream`) is ``control.evaluation.evaluate_policy`` per goal
  over the dataset's episode length, with the DSRL reference of ``reward_reference`` (the
  dataset's lowest and highest complete-episode return for that goal); the learner's seed is
  the evaluation seed, so evaluations are reproducible.
- Periodic validation (``validate_every`` > 0): every that many steps, where the learner
  ``can_validate`` (latent learners: in stage 2 only, when their composed policy exists),
  :func:`run_learner` evaluates the current policy on ``validate_goals`` held-out downstream
  goals that are *not* the final evaluation's (:func:`validation_goals`; the evaluation goals
  only when no other held-out goal is left) with ``validate_episodes`` episodes each and env
  seeds offset by ``VALIDATION_SEED_OFFSET``, and logs one ``{"step", "event": "validation",
  "eval/normalized_reward", ...}`` line. Evaluation touches neither random generator of the
  learner, so a run with validation trains exactly as one without; ``control.learners.
  validation`` reads these lines and says whether the validation return levelled off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from control.data import Dataset
from control.evaluation import evaluate_policy, reward_reference
from control.policies import mlp
from control.tasks import TaskSpec
from llm_safepref.core.lagrange import LagrangeMultiplier
from llm_safepref.core.schema import Metric

__all__ = [
    "CHECKPOINT_FORMAT",
    "WarmStart",
    "config_dict",
    "save_checkpoint",
    "LearnerConfig",
    "Learner",
    "GoalConditionedPolicy",
    "goal_scale",
    "train_goals",
    "eval_goals",
    "RunLog",
    "CheckpointMismatch",
    "run_learner",
    "LearnerRun",
    "evaluate_downstream",
    "dataset_obs_stats",
    "dataset_features",
    "validation_goals",
    "VALIDATION_SEED_OFFSET",
]

CHECKPOINT_FORMAT = "control-learner-checkpoint-1"
#: Validation episodes use env seeds of ``seed + VALIDATION_SEED_OFFSET`` (never the final evaluation's).
VALIDATION_SEED_OFFSET = 1_000_003


@dataclass
class LearnerConfig:
    """Fields every learner has (a learner's own config extends it)."""

    steps: int = field(default=100, metadata={"help": "Gradient steps in all (warm-up phases included)."})
    batch_size: int = field(default=64, metadata={"help": "Transitions, segment pairs or segments per step."})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the networks."})
    hidden: int = field(default=256, metadata={"help": "Width of every MLP."})
    layers: int = field(default=2, metadata={"help": "Hidden layers of every MLP."})
    eval_goals: int = field(default=4, metadata={"help": "Held-out downstream goals evaluated (never user goals)."})
    eval_episodes: int = field(default=5, metadata={"help": "Evaluation episodes per goal."})
    eval_n_envs: int = field(default=2, metadata={"help": "Envs stepped in lockstep during evaluation."})
    log_every: int = field(default=10, metadata={"help": "Steps between JSONL log lines."})
    checkpoint_every: int = field(default=50, metadata={"help": "Steps between checkpoints (one is also written "
                                                                   "at the end)."})
    threads: int = field(default=1, metadata={"help": "torch threads (1: suite workers share the cores)."})
    validate_every: int = field(default=0, metadata={"help": "Steps between validation evaluations during "
                                                              "training (0: none)."})
    validate_goals: int = field(default=4, metadata={"help": "Held-out downstream goals of each validation (not the "
                                                             "final evaluation's)."})
    validate_episodes: int = field(default=1, metadata={"help": "Episodes per goal of each validation."})
    cost_threshold_scale: float = field(default=1.0, metadata={
        "help": "The cost threshold is the task's kappa x this (PRESA's safety labels, BC-safe's kept windows, "
                "the ground-truth-cost baseline's budget; the threshold arms <method>_k<s>). Methods that read no "
                "threshold ignore it; the evaluation is always normalised by kappa itself (C / kappa)."})

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden", "layers", "eval_goals", "eval_episodes", "eval_n_envs",
                     "log_every", "checkpoint_every", "threads", "validate_goals", "validate_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"{type(self).__name__}.lr must be > 0, got {self.lr}")
        if not self.cost_threshold_scale > 0:
            raise ValueError(f"{type(self).__name__}.cost_threshold_scale must be > 0, got {self.cost_threshold_scale}")
        if self.validate_every < 0:
            raise ValueError(f"{type(self).__name__}.validate_every must be >= 0 (0: no validation), got "
                             f"{self.validate_every}")


# --------------------------------------------------------------------------- goals


def goal_scale(spec: TaskSpec) -> np.ndarray:
    """(goal_dim,) ``max(|goal_low|, |goal_high|)``, 1 where that is 0 (as ``BatchCollector``)."""
    scale = np.maximum(np.abs(spec.goal_low), np.abs(spec.goal_high)).astype(np.float64)
    scale[scale == 0] = 1.0
    return scale


def train_goals(spec: TaskSpec) -> np.ndarray:
    """(G, goal_dim): the downstream grid; training relabels rewards for goals drawn from it."""
    return np.asarray(spec.downstream_goals, dtype=np.float64)


def eval_goals(spec: TaskSpec, n: int) -> np.ndarray:
    """(min(n, G'), goal_dim): ``n`` evenly spaced downstream goals that are no user goal.

    The crowd labelled the user goals; the downstream tasks are the others.
    """
    grid = train_goals(spec)
    is_user = (np.abs(grid[:, None, :] - spec.user_goals[None, :, :]).max(-1) < 1e-9).any(1)
    held_out = grid[~is_user]
    if len(held_out) == 0:
        raise ValueError(f"{spec.name}: every downstream goal is a user goal; nothing to evaluate on")
    idx = np.unique(np.round(np.linspace(0, len(held_out) - 1, min(n, len(held_out)))).astype(int))
    return held_out[idx]


def validation_goals(spec: TaskSpec, n: int, n_eval: int) -> np.ndarray:
    """(min(n, G''), goal_dim): ``n`` evenly spaced held-out goals that are neither user goals nor
    among ``eval_goals(spec, n_eval)``; the evaluation goals themselves when none is left (e.g. at
    ``paper`` scale, which evaluates on every held-out goal).

    The learning curve is read on these; the final table on the evaluation goals.
    """
    grid = train_goals(spec)
    is_user = (np.abs(grid[:, None, :] - spec.user_goals[None, :, :]).max(-1) < 1e-9).any(1)
    held_out = grid[~is_user]
    ev = eval_goals(spec, n_eval)
    is_eval = (np.abs(held_out[:, None, :] - ev[None, :, :]).max(-1) < 1e-9).any(1)
    pool = held_out[~is_eval] if (~is_eval).any() else ev
    idx = np.unique(np.round(np.linspace(0, len(pool) - 1, min(n, len(pool)))).astype(int))
    return pool[idx]


# --------------------------------------------------------------------------- data views


def dataset_obs_stats(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (floored at 1e-3) of the observations, float32 (obs_dim,)."""
    obs = ds["observations"].astype(np.float64)
    return obs.mean(0).astype(np.float32), np.maximum(obs.std(0), 1e-3).astype(np.float32)


def dataset_features(ds: Dataset) -> dict[str, np.ndarray]:
    """The per-step features {name: (N,) float64} that ``TaskSpec.reward`` relabels from."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in ds.features.items()}


# --------------------------------------------------------------------------- networks


class GoalConditionedPolicy(nn.Module):
    """Deterministic ``a = tanh(MLP([(s - m) / sd, g / goal_scale]))``; CPL's unit-variance mean.

    ``forward(obs (..., obs_dim), goal (..., goal_dim))`` broadcasts the goal over leading
    dims, so (B, L, obs_dim) segments with (B, 1, goal_dim) goals work.
    """

    def __init__(self, obs_dim: int, goal_dim: int, act_dim: int, hidden: int, layers: int,
                 obs_mean: np.ndarray, obs_std: np.ndarray, goal_scale_: np.ndarray):
        super().__init__()
        self.net = mlp(obs_dim + goal_dim, act_dim, hidden, layers)
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))
        self.register_buffer("goal_scale", torch.as_tensor(goal_scale_, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_mean) / self.obs_std
        g = (goal / self.goal_scale).expand(*x.shape[:-1], goal.shape[-1])
        return torch.tanh(self.net(torch.cat([x, g], -1)))

    @torch.no_grad()
    def act(self, obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(n, obs_dim) numpy observations and a (goal_dim,) goal -> (n, A) float64 actions."""
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        g = torch.as_tensor(np.asarray(goal), dtype=torch.float32).expand(len(o), -1)
        return self(o, g).numpy().astype(np.float64)


# --------------------------------------------------------------------------- learner protocol


class Learner:
    """Base of the learners: state that :func:`run_learner` checkpoints, and ``train_step``.

    Subclasses set ``modules``, ``optimizers`` (and ``multiplier`` when they have one) in
    ``__init__`` and implement :meth:`train_step` and :meth:`policy`.
    """

    method: str = ""

    def __init__(self, config: LearnerConfig, ds: Dataset, seed: int):
        self.config = config
        self.ds = ds
        self.spec = ds.spec
        self.seed = int(seed)
        torch.manual_seed(self.seed)  # network initialisation only; training draws from the two below
        self.rng = np.random.default_rng(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.multiplier: LagrangeMultiplier | None = None

    def train_step(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def policy(self) -> GoalConditionedPolicy:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Facts about the training data for the run record (sizes, thresholds)."""
        return {}

    def can_validate(self, step: int) -> bool:
        """Whether :meth:`policy` after ``step`` steps is a policy worth validating (latent learners: stage 2)."""
        return True

    def warm_start(self) -> "WarmStart | None":
        """Load a shared state to start from instead of step 0 (a run without its own checkpoint); None: step 0.

        PRESA-type runs start after the BC warm-up they share (``presa.BCWarmupLearner``).
        """
        return None

    # -- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "multiplier": None if self.multiplier is None else self.multiplier.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.multiplier is not None:
            self.multiplier.load_state_dict(state["multiplier"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.generator.set_state(state["torch_generator"])


# --------------------------------------------------------------------------- log and checkpoint


@dataclass
class WarmStart:
    """What :meth:`Learner.warm_start` loaded: the step it stands at, the log rows up to it, where it came from."""

    step: int
    rows: list[dict[str, Any]]
    source: str


class RunLog:
    """``out_dir/log.jsonl``: one JSON object per line, ``{"step": s, <metric>: value, ...}``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (a resumed run rewrites what came after)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line half-written when the process was killed
                continue
            if row.get("step", 0) <= step:
                keep.append(json.dumps(row))
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, row: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(dict(row), default=float) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class CheckpointMismatch(ValueError):
    """A checkpoint of another method or config sits where this run would resume."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` of ``payload`` to ``path`` through a temporary file, so a kill leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint


def config_dict(config) -> dict:
    """A config dataclass as the JSON a checkpoint stores (nested configs as dicts, other objects as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


#: Config fields that change no training step (validation only reads the policy): not compared on resume.
NOT_TRAINING_FIELDS = ("validate_every", "validate_goals", "validate_episodes")


def _check_checkpoint(state: Mapping, method: str, config) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(f"checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if state.get("method") != method:
        raise CheckpointMismatch(f"checkpoint of method {state.get('method')!r}, this run is {method!r}")
    want, have = config_dict(config), state.get("config", {})
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k) and k not in NOT_TRAINING_FIELDS)
    if diff:
        raise CheckpointMismatch("checkpoint config differs in " + ", ".join(
            f"{k} (checkpoint {have.get(k)!r}, this run {want.get(k)!r})" for k in diff))


class LearnerRun:
    """One learner's run folder: resume on construction, then :meth:`record` after every step, :meth:`finish`.

    :func:`run_learner` drives one learner with it; ``control.learners.ensemble`` drives the
    members of a batched ensemble with one each (so both write the same logs and checkpoints).
    """

    def __init__(self, learner: Learner, out_dir: str | Path, *, log: Callable[[str], None] | None = None):
        self.learner, self.cfg = learner, learner.config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.run_log = RunLog(self.out_dir / "log.jsonl")
        say = log or (lambda s: None)
        self.start, self.resumed_from = 0, None
        if self.ckpt_path.exists():
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            try:
                _check_checkpoint(state, learner.method, self.cfg)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(f"{self.ckpt_path}: {e}; delete {self.out_dir} to start this run "
                                         "afresh") from None
            learner.load_state_dict(state["learner"])
            self.start = self.resumed_from = int(state["step"])
            self.run_log.truncate_after(self.start)
            self.run_log.write({"event": "resume", "step": self.start})
            say(f"resumed from step {self.start} ({self.ckpt_path})")
        else:
            self.run_log.truncate_after(-1)  # no checkpoint: any old log belongs to no run
            warm = learner.warm_start()
            if warm is not None:  # the shared state's log lines first, so the run's log reads as one run
                for row in warm.rows:
                    self.run_log.write(row)
                self.run_log.write({"event": "warm_start", "step": warm.step, "from": warm.source})
                self.start = warm.step
                say(f"warm start at step {warm.step} ({warm.source})")
        self.last: dict[str, float] = {}

    def needs_state(self, done: int) -> bool:
        """Whether :meth:`record` after ``done`` steps reads the learner's weights (validation, checkpoint)."""
        cfg = self.cfg
        return bool((cfg.validate_every and done % cfg.validate_every == 0 and self.learner.can_validate(done))
                    or done % cfg.checkpoint_every == 0 or done == cfg.steps)

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """After ``train_step(step)`` returned ``metrics``: log, validate and checkpoint as due."""
        cfg, learner = self.cfg, self.learner
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            self.last = {k: float(v) for k, v in metrics.items()}
            if learner.multiplier is not None:
                self.last.setdefault(Metric.NU, float(learner.multiplier.value))
            self.run_log.write({"step": done, **self.last})
        if cfg.validate_every and done % cfg.validate_every == 0 and learner.can_validate(done):
            self.run_log.write({"step": done, "event": "validation", **validate(learner, done)})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(self.ckpt_path, {"format": CHECKPOINT_FORMAT, "method": learner.method,
                                              "config": config_dict(cfg), "step": done,
                                              "learner": learner.state_dict()})

    def finish(self) -> dict[str, Any]:
        if self.start >= self.cfg.steps:  # already complete: the last logged metrics
            rows = [r for r in self.run_log.rows() if "event" not in r]
            self.last = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
        return {"steps": self.cfg.steps, "resumed_from": self.resumed_from, "last": self.last,
                "log": str(self.run_log.path), "checkpoint": str(self.ckpt_path)}


def run_learner(learner: Learner, out_dir: str | Path, *, log: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Train ``learner`` to ``config.steps`` with resume, logging and checkpoints (module docstring).

    Returns ``{"steps", "resumed_from", "last": last logged metrics, "log": path, "checkpoint": path}``.
    """
    run = LearnerRun(learner, out_dir, log=log)
    for step in range(run.start, learner.config.steps):
        run.record(step, learner.train_step(step))
    return run.finish()


# --------------------------------------------------------------------------- evaluation


def validate(learner: Learner, step: int) -> dict[str, float]:
    """One validation of ``learner.policy()`` (module docstring): the ``eval/...`` means over its goals."""
    cfg = learner.config
    goals = validation_goals(learner.spec, cfg.validate_goals, cfg.eval_goals)
    res = evaluate_downstream(learner.policy(), learner.ds, cfg, learner.seed + VALIDATION_SEED_OFFSET, goals=goals,
                              episodes=cfg.validate_episodes)
    return {k: v for k, v in res["metrics"].items() if k != "eval/horizon"}


def evaluate_downstream(policy: GoalConditionedPolicy, ds: Dataset, config: LearnerConfig, seed: int, *,
                        goals: np.ndarray | None = None, episodes: int | None = None) -> dict[str, Any]:
    """Evaluate a goal-conditioned policy on the held-out downstream goals (module docstring).

    ``goals`` (G, goal_dim) and ``episodes`` per goal default to ``eval_goals(spec,
    config.eval_goals)`` and ``config.eval_episodes`` (validation passes its own).
    Returns ``{"metrics": {eval/...: mean over goals}, "per_goal": [{goal, return_mean,
    cost_mean, normalized_reward, normalized_cost, reward_ref}]}``; the normalised values are
    DSRL's (reward min-max against the dataset's episodes, cost ÷ kappa).
    """
    spec = ds.spec
    horizon = int(ds.meta["max_episode_steps"])
    goals = eval_goals(spec, config.eval_goals) if goals is None else goals
    episodes = config.eval_episodes if episodes is None else int(episodes)
    policy.eval()
    per_goal = []
    for goal in goals:
        ref = reward_reference(ds, goal)
        res = evaluate_policy(lambda obs, g=goal: policy.act(obs, g), spec.name, goal,
                              episodes=episodes, seed=seed, n_envs=config.eval_n_envs,
                              reward_ref=ref, max_episode_steps=horizon)
        per_goal.append({"goal": goal.tolist(), "return_mean": float(res.returns.mean()),
                         "cost_mean": float(res.costs.mean()), "normalized_reward": res.normalized_reward,
                         "normalized_cost": res.normalized_cost, "reward_ref": list(ref)})
    policy.train()

    def mean(key):
        return float(np.mean([g[key] for g in per_goal]))

    metrics = {"eval/return_mean": mean("return_mean"), "eval/cost_mean": mean("cost_mean"),
               Metric.EVAL_NORMALIZED_REWARD: mean("normalized_reward"),
               Metric.EVAL_NORMALIZED_COST: mean("normalized_cost"),
               "eval/goals": len(per_goal), "eval/episodes_per_goal": episodes,
               "eval/horizon": horizon}
    if not all(math.isfinite(v) for v in (metrics["eval/return_mean"], metrics["eval/cost_mean"])):
        raise ValueError(f"{spec.name}: evaluation produced a non-finite return or cost")
    return {"metrics": metrics, "per_goal": per_goal}
