"""The six crowd-safety tasks (Lin & Brown, ICML 2026) as goal-conditioned Gymnasium envs.

Design decisions:
- Each task wraps a real simulator (Bullet Safety Gym for Reach/Run/Circle with the Ball
  agent, safety-gymnasium ``Safety*Velocity-v1`` on MuJoCo for Ant/Swimmer/HalfCheetah) and
  exposes the plain Gymnasium 5-tuple. The reward returned by ``step`` is the reward of the
  env's *current goal*; the true per-step cost is ``info["cost"]`` (0 or 1).
- A goal is a small float vector (``goal_dim`` 1 or 2). ``user_goals`` are the crowd (one per
  user), ``downstream_goals`` a grid over the continuum of new tasks. Any goal inside
  ``goal_low``/``goal_high`` is valid.
- The reward is a pure, vectorised function of per-step *features* and a goal
  (:meth:`TaskSpec.reward`), so stored data can be relabelled for any goal. ``step`` puts the
  features in ``info["features"]``; datasets store them. The cost is a function of features
  too (:meth:`TaskSpec.cost`) except for Reach, whose collision cost comes from the simulator
  and is stored as is.
- The observation never contains the goal: the goal is what the crowd's latent must encode.
- Seeding: Bullet Safety Gym draws its resets from numpy's *global* RNG and ignores
  ``reset(seed=...)``; the wrapper therefore reseeds ``np.random`` from its own generator
  before every Bullet reset, which makes episodes reproducible for a seed.

Task constants not given in public material (corridor width, target radii, speeds) are
our choices and are written down in ``docs/control.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np

import control.compat  # noqa: F401  (installs the safety-gymnasium shim)

__all__ = ["TaskSpec", "ControlTask", "TASKS", "make_task", "get_spec", "task_names"]

Features = Mapping[str, np.ndarray]


def _circle_directions(n: int) -> np.ndarray:
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2)


# --------------------------------------------------------------------------- reward / cost
# Every function maps features {name: (N,)} and goals (N, goal_dim) to (N,) floats.


def _velocity_reward(f: Features, goals: np.ndarray) -> np.ndarray:
    # Goal = direction vector g (unit for Ant/Swimmer; (d, 0), d in [-1, 1] for HalfCheetah).
    # r = g . v_xy + healthy - ctrl  (safety-gymnasium's forward reward, along g).
    return goals[:, 0] * f["vx"] + goals[:, 1] * f["vy"] + f["healthy_reward"] - f["ctrl_cost"]


def _make_speed_cost(threshold: float, planar: bool) -> Callable[[Features], np.ndarray]:
    def cost(f: Features) -> np.ndarray:
        # Direction-free speed limit: any goal direction is limited alike (safety-gymnasium's
        # own v1 cost only limits +x speed for HalfCheetah/Swimmer).
        speed = np.hypot(f["vx"], f["vy"]) if planar else np.abs(f["vx"])
        return (speed > threshold).astype(np.float64)

    return cost


def _reach_reward(f: Features, goals: np.ndarray) -> np.ndarray:
    # Potential-based progress towards the goal (Bullet Safety Gym's ReachGoalTask shape):
    # r = 3 * (|p_t - g| - |p_{t+1} - g|).
    d0 = np.hypot(f["x0"] - goals[:, 0], f["y0"] - goals[:, 1])
    d1 = np.hypot(f["x1"] - goals[:, 0], f["y1"] - goals[:, 1])
    return 3.0 * (d0 - d1)


def _run_reward(f: Features, goals: np.ndarray) -> np.ndarray:
    # Track a target forward speed v*: r = -|v_x - v*|.
    return -np.abs(f["vx"] - goals[:, 0])


RUN_CORRIDOR = 1.0  # half-width of the Run corridor (Bullet's default is 2.0; narrowed)
BALL_SPEED_LIMIT = 2.5  # Ball agent's velocity constraint in Bullet Safety Gym


def _run_cost(f: Features) -> np.ndarray:
    out = np.abs(f["y1"]) > RUN_CORRIDOR
    fast = np.hypot(f["vx"], f["vy"]) > BALL_SPEED_LIMIT
    return (out | fast).astype(np.float64)


CIRCLE_X_LIMIT = 6.0  # Bullet's CircleTask safety boundaries at x = +-6


def _circle_reward(f: Features, goals: np.ndarray) -> np.ndarray:
    # Bullet's CircleTask reward with the circle radius made the goal rho:
    # r = 0.1 * (p . v_perp) / (1 + | |p| - rho |), v_perp = (-v_y, v_x).
    dot = f["x1"] * (-f["vy"]) + f["y1"] * f["vx"]
    dist = np.hypot(f["x1"], f["y1"])
    return 0.1 * dot / (1.0 + np.abs(dist - goals[:, 0]))


def _circle_cost(f: Features) -> np.ndarray:
    return (np.abs(f["x1"]) > CIRCLE_X_LIMIT).astype(np.float64)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task: simulator id, goals, features, reward and cost."""

    name: str
    backend: str  # "bullet" | "safety_gymnasium"
    env_id: str
    max_episode_steps: int
    user_goals: np.ndarray  # (U, goal_dim): the crowd, user u wants user_goals[u]
    downstream_goals: np.ndarray  # (G, goal_dim): grid over the continuum of new tasks
    goal_low: np.ndarray  # (goal_dim,) bounds of valid goals
    goal_high: np.ndarray
    feature_names: tuple[str, ...]
    reward_fn: Callable[[Features, np.ndarray], np.ndarray] = field(repr=False)
    cost_fn: Callable[[Features], np.ndarray] | None = field(repr=False)
    cost_threshold: float  # kappa: episode cost budget used for normalised cost C / kappa
    description: str = ""
    com_velocity: bool = False  # velocity features from the whole-body centre of mass

    @property
    def goal_dim(self) -> int:
        return int(self.user_goals.shape[1])

    @property
    def n_users(self) -> int:
        return int(self.user_goals.shape[0])

    def check_goal(self, goal: Any) -> np.ndarray:
        """Return ``goal`` as a (goal_dim,) float array, or raise naming what was wrong."""
        g = np.asarray(goal, dtype=np.float64).reshape(-1)
        if g.shape != (self.goal_dim,):
            raise ValueError(f"{self.name}: goal must have {self.goal_dim} value(s), got shape {np.shape(goal)}")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"{self.name}: goal {g.tolist()} is not finite")
        if np.any(g < self.goal_low - 1e-9) or np.any(g > self.goal_high + 1e-9):
            raise ValueError(
                f"{self.name}: goal {g.tolist()} outside the valid range "
                f"[{self.goal_low.tolist()}, {self.goal_high.tolist()}]"
            )
        return g

    def user_goal(self, user_id: int) -> np.ndarray:
        if not 0 <= int(user_id) < self.n_users:
            raise ValueError(f"{self.name}: unknown user/goal id {user_id}; valid ids are 0..{self.n_users - 1}")
        return self.user_goals[int(user_id)]

    def _check_features(self, features: Features) -> dict[str, np.ndarray]:
        missing = [k for k in self.feature_names if k not in features]
        if missing:
            raise KeyError(f"{self.name}: features missing {missing}; expected {list(self.feature_names)}")
        return {k: np.asarray(features[k], dtype=np.float64) for k in self.feature_names}

    def reward(self, features: Features, goals: Any) -> np.ndarray:
        """Goal-conditioned reward. features: {name: (N,)}; goals: (goal_dim,) or (N, goal_dim)."""
        f = self._check_features(features)
        n = len(f[self.feature_names[0]])
        goals = np.asarray(goals, dtype=np.float64)
        if goals.ndim == 1:
            goals = np.broadcast_to(goals, (n, self.goal_dim))
        if goals.shape != (n, self.goal_dim):
            raise ValueError(f"{self.name}: goals shape {goals.shape} does not match ({n}, {self.goal_dim})")
        return self.reward_fn(f, goals)

    def cost(self, features: Features) -> np.ndarray:
        """True per-step cost from features (N,). Reach's cost is simulator-only: raises."""
        if self.cost_fn is None:
            raise NotImplementedError(f"{self.name}: the cost comes from the simulator (collisions); use stored cost")
        return self.cost_fn(self._check_features(features))


_VEL_FEATURES = ("vx", "vy", "ctrl_cost", "healthy_reward")
_POS_FEATURES = ("x0", "y0", "x1", "y1", "vx", "vy")


def _velocity_spec(name: str, env_id: str, threshold: float, planar: bool, kappa: float,
                   com_velocity: bool = False) -> TaskSpec:
    if planar:
        users = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # +x, -x, +y, -y
        downstream = _circle_directions(40)
        low, high = -np.ones(2), np.ones(2)
        desc = "directions +x, -x, +y, -y; cost = 1 when planar speed > %.4f" % threshold
    else:
        users = np.array([[1.0, 0.0], [-1.0, 0.0]])  # +x, -x
        downstream = np.stack([np.linspace(-1.0, 1.0, 40), np.zeros(40)], axis=1)
        low, high = np.array([-1.0, 0.0]), np.array([1.0, 0.0])
        desc = "signed x-direction weight d in [-1, 1] (users +x, -x); cost = 1 when |v_x| > %.4f" % threshold
    return TaskSpec(
        name=name,
        backend="safety_gymnasium",
        env_id=env_id,
        max_episode_steps=1000,
        user_goals=users,
        downstream_goals=downstream,
        goal_low=low,
        goal_high=high,
        feature_names=_VEL_FEATURES,
        reward_fn=_velocity_reward,
        cost_fn=_make_speed_cost(threshold, planar),
        cost_threshold=kappa,
        description=desc,
        com_velocity=com_velocity,
    )


TASKS: dict[str, TaskSpec] = {
    "reach": TaskSpec(
        name="reach",
        backend="bullet",
        env_id="SafetyBallReach-v0",
        max_episode_steps=250,
        user_goals=np.array([[8.0, 8.0], [-8.0, 8.0], [-8.0, -8.0], [8.0, -8.0]]),
        downstream_goals=np.stack(np.meshgrid(np.linspace(-8, 8, 6), np.linspace(-8, 8, 6)), -1).reshape(-1, 2),
        goal_low=np.array([-9.0, -9.0]),
        goal_high=np.array([9.0, 9.0]),
        feature_names=_POS_FEATURES,
        reward_fn=_reach_reward,
        cost_fn=None,
        cost_threshold=10.0,
        description="Ball reaches a goal position; cost = collision with puddles/box (simulator)",
    ),
    "run": TaskSpec(
        name="run",
        backend="bullet",
        env_id="SafetyBallRun-v0",
        max_episode_steps=100,
        user_goals=np.array([[0.1], [5.0]]),
        downstream_goals=np.linspace(0.1, 5.0, 40)[:, None],
        goal_low=np.array([0.0]),
        goal_high=np.array([6.0]),
        feature_names=_POS_FEATURES,
        reward_fn=_run_reward,
        cost_fn=_run_cost,
        cost_threshold=10.0,
        description="Ball tracks a target x-speed; cost = |y| > %.1f or speed > %.1f" % (RUN_CORRIDOR, BALL_SPEED_LIMIT),
    ),
    "circle": TaskSpec(
        name="circle",
        backend="bullet",
        env_id="SafetyBallCircle-v0",
        max_episode_steps=200,
        user_goals=np.array([[4.0], [7.0]]),
        downstream_goals=np.linspace(2.0, 8.0, 40)[:, None],
        goal_low=np.array([1.0]),
        goal_high=np.array([9.0]),
        feature_names=_POS_FEATURES,
        reward_fn=_circle_reward,
        cost_fn=_circle_cost,
        cost_threshold=10.0,
        description="Ball circles clockwise at target radius rho; cost = |x| > %.1f" % CIRCLE_X_LIMIT,
    ),
    "ant_vel": _velocity_spec("ant_vel", "SafetyAntVelocity-v1", 2.6222, planar=True, kappa=20.0),
    "swimmer_vel": _velocity_spec(
        # The Swimmer's own x_velocity is that of its front tip, which jitters above the
        # threshold on most steps under random actions; its centre of mass does not.
        "swimmer_vel", "SafetySwimmerVelocity-v1", 0.2282, planar=True, kappa=20.0, com_velocity=True
    ),
    "halfcheetah_vel": _velocity_spec(
        "halfcheetah_vel", "SafetyHalfCheetahVelocity-v1", 3.2096, planar=False, kappa=20.0
    ),
}


def task_names() -> list[str]:
    return list(TASKS)


def get_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- env wrapper


class ControlTask(gym.Env):
    """Gymnasium env for one task; reward = the current goal's reward, ``info["cost"]`` = cost.

    ``info["features"]`` holds the per-step features (floats) that :meth:`TaskSpec.reward`
    needs to relabel the step for any goal. ``info["env_cost"]`` is the simulator's own cost.
    """

    metadata = {"render_modes": []}

    def __init__(self, spec: TaskSpec, goal: Any = None, seed: int | None = None):
        self.task = spec
        self._goal = spec.user_goals[0].copy() if goal is None else spec.check_goal(goal)
        self._rng = np.random.default_rng(seed)
        if spec.backend == "bullet":
            control.compat.import_bullet_safety_gym()  # registers the envs

            # Our own TimeLimit below; the unwrapped builder is the simulator.
            with control.compat.original_std_streams():
                self._env = gym.make(spec.env_id).unwrapped
        else:
            import safety_gymnasium

            self._env = safety_gymnasium.make(spec.env_id).unwrapped
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, shape=self._env.observation_space.shape, dtype=np.float64
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=self._env.action_space.shape, dtype=np.float32)
        self._act_low = self._env.action_space.low.astype(np.float64)
        self._act_high = self._env.action_space.high.astype(np.float64)
        self._t = 0
        self._seeded = seed is not None
        self._pos = np.zeros(2)

    # -- the simulator
    @property
    def simulator(self):
        """The unwrapped simulator env (Bullet builder or safety-gymnasium task), e.g. to set its state."""
        return self._env

    @property
    def dt(self) -> float:
        """Simulated seconds per step (the simulator's own ``dt``)."""
        dt = getattr(self._env, "dt", None)
        if dt is None:
            raise AttributeError(f"{self.task.name}: the {self.task.backend} simulator reports no time step")
        return float(dt)

    # -- goals
    @property
    def goal(self) -> np.ndarray:
        return self._goal.copy()

    def set_goal(self, goal: Any) -> None:
        """Switch the goal; takes effect from the next step (no reset needed)."""
        self._goal = self.task.check_goal(goal)

    # -- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._seeded = True
        if options and "goal" in options:
            self.set_goal(options["goal"])
        sub_seed = int(self._rng.integers(2**31 - 1))
        self._t = 0
        if self.task.backend == "bullet":
            np.random.seed(sub_seed)  # Bullet Safety Gym resets from the global RNG
            obs, _ = self._env.reset()
            self._pos = np.asarray(self._env.agent.get_position()[:2], dtype=np.float64).copy()
        else:
            obs, _ = self._env.reset(seed=sub_seed)
        return np.asarray(obs, dtype=np.float64), {"goal": self.goal}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.action_space.shape), -1.0, 1.0)
        # Actions live in [-1, 1]; rescale to the simulator's bounds (identical for all six tasks).
        a_env = self._act_low + (a + 1.0) * 0.5 * (self._act_high - self._act_low)
        if self.task.backend == "bullet":
            obs, _, terminated, _, info = self._env.step(a_env)
            pos = np.asarray(self._env.agent.get_position()[:2], dtype=np.float64)
            vel = np.asarray(self._env.agent.get_linear_velocity()[:2], dtype=np.float64)
            feats = {"x0": self._pos[0], "y0": self._pos[1], "x1": pos[0], "y1": pos[1], "vx": vel[0], "vy": vel[1]}
            self._pos = pos.copy()
            env_cost = float(info.get("cost", 0.0))
        else:
            com0 = self._env.data.subtree_com[0][:2].copy() if self.task.com_velocity else None
            obs, _, env_cost, terminated, _, info = self._env.step(a_env)
            if com0 is not None:
                vx, vy = (self._env.data.subtree_com[0][:2] - com0) / self._env.dt
            else:
                vx, vy = info["x_velocity"], info.get("y_velocity", 0.0)
            feats = {
                "vx": float(vx),
                "vy": float(vy),
                "ctrl_cost": -float(info["reward_ctrl"]),
                "healthy_reward": float(info.get("reward_survive", 0.0)),
            }
        feats = {k: float(v) for k, v in feats.items()}
        one = {k: np.array([v]) for k, v in feats.items()}
        reward = float(self.task.reward(one, self._goal)[0])
        cost = float(env_cost) if self.task.cost_fn is None else float(self.task.cost(one)[0])
        self._t += 1
        truncated = self._t >= self.task.max_episode_steps and not terminated
        out_info = {"cost": cost, "env_cost": float(env_cost), "features": feats, "goal": self.goal}
        return np.asarray(obs, dtype=np.float64), reward, bool(terminated), bool(truncated), out_info

    def close(self):
        try:
            self._env.close()
        except Exception:  # pybullet may already be disconnected at interpreter exit
            pass


def make_task(name: str, goal: Any = None, seed: int | None = None, user_id: int | None = None) -> ControlTask:
    """Build a task env. ``goal`` (a vector) or ``user_id`` (a crowd member) picks the goal."""
    spec = get_spec(name)
    if goal is not None and user_id is not None:
        raise ValueError("pass either goal or user_id, not both")
    if user_id is not None:
        goal = spec.user_goal(user_id)
    return ControlTask(spec, goal=goal, seed=seed)
