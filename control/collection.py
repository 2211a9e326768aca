"""Batched episode collection: ``n`` envs of one task stepped in lockstep.

Design decisions:

- Both behaviour learners collect through :class:`BatchCollector`: the goal-conditioned SAC
  of ``control.data`` and the CEM gait search of ``control.gaits``. It lives in its own module
  so that both import it at module level (it used to sit in ``control.data``, which
  ``control.gaits`` then imported back inside a function: an import cycle).
- One batched policy call per step for all envs: the caller computes a batch of actions
  (n, A) from :attr:`BatchCollector.obs` (n, obs_dim) and :meth:`BatchCollector.conds`
  (n, goal_dim + 1) and passes it to :meth:`BatchCollector.step`.
- Every episode runs under one *condition* ``(goal_id, lambda, noise)``: the user goal the
  behaviour policy pursues (-1: none), the penalty lambda of its objective and the std of the
  action noise added to it. The condition is stored on every row of the episode.
- Finished episodes are kept in the order they end, as dicts of (T,) / (T, d) arrays with
  the dataset's column names (``control.data`` adds ``episode_ids`` and ``rewards`` when it
  concatenates them).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from control.tasks import TaskSpec, get_spec, make_task

__all__ = ["Condition", "BatchCollector"]

#: ``(goal_id, lambda, noise)`` of one episode's behaviour policy.
Condition = tuple[int, float, float]


class BatchCollector:
    """Steps ``n_envs`` envs of one task in lockstep; stores finished episodes in order.

    ``choose(i) -> Condition`` picks the condition of env i's next episode when it auto-resets;
    :meth:`begin` / :meth:`begin_batch` start episodes under given conditions.
    """

    def __init__(self, task: str, n_envs: int, seed: int, horizon: int | None = None):
        self.spec: TaskSpec = get_spec(task)
        self.envs = [make_task(task, seed=seed * 10_007 + i) for i in range(n_envs)]
        self.horizon = horizon or self.spec.max_episode_steps
        self.goal_scale = np.maximum(np.abs(self.spec.goal_low), np.abs(self.spec.goal_high))
        self.goal_scale[self.goal_scale == 0] = 1.0
        self.episodes: list[dict[str, np.ndarray]] = []
        self._running: list[list[dict[str, Any]]] = [[] for _ in range(n_envs)]
        self._cond: list[Condition] = [(-1, 0.0, 0.0)] * n_envs
        self._obs = np.zeros((n_envs, self.obs_dim))
        self._t = np.zeros(n_envs, dtype=int)
        self.done = np.zeros(n_envs, dtype=bool)

    # -- shapes and state (read-only views)
    @property
    def n_envs(self) -> int:
        return len(self.envs)

    @property
    def obs_dim(self) -> int:
        return int(self.envs[0].observation_space.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.envs[0].action_space.shape[0])

    @property
    def dt(self) -> float:
        """Simulated seconds per env step."""
        return self.envs[0].dt

    @property
    def obs(self) -> np.ndarray:
        """Current observations (n, obs_dim), a copy."""
        return self._obs.copy()

    @property
    def timesteps(self) -> np.ndarray:
        """Steps taken so far in each env's running episode (n,), a copy."""
        return self._t.copy()

    # -- conditions
    def cond_vector(self, goal_id: int, lam: float) -> np.ndarray:
        """``[goal / goal_scale, lambda / 10]`` (goal_dim + 1,); a zero goal for goal id -1."""
        goal = np.zeros(self.spec.goal_dim) if goal_id < 0 else self.spec.user_goals[goal_id]
        return np.concatenate([goal / self.goal_scale, [lam / 10.0]])

    def conds(self) -> np.ndarray:
        """Condition vectors of the running episodes (n, goal_dim + 1)."""
        return np.stack([self.cond_vector(g, lam) for g, lam, _ in self._cond])

    # -- episodes
    def start(self, choose: Callable[[int], Condition]) -> None:
        """Begin an episode in every env, under ``choose(i)``."""
        for i in range(self.n_envs):
            self.begin(i, choose(i))

    def begin(self, i: int, condition: Condition) -> None:
        """Reset env i and start an episode under ``condition``."""
        self._cond[i] = tuple(condition)
        goal_id = self._cond[i][0]
        if goal_id >= 0:
            self.envs[i].set_goal(self.spec.user_goals[goal_id])
        self._obs[i], _ = self.envs[i].reset()
        self._t[i] = 0
        self._running[i] = []

    def begin_batch(self, conditions: Sequence[Condition]) -> None:
        """Start one episode per condition in envs 0..k-1; the other envs stay idle (``done``)."""
        if len(conditions) > self.n_envs:
            raise ValueError(f"{len(conditions)} conditions for {self.n_envs} envs")
        self.done[:] = True
        for i, condition in enumerate(conditions):
            self.begin(i, condition)
            self.done[i] = False

    def step(self, actions: np.ndarray, choose: Callable[[int], Condition] | None, source: int,
             continue_: bool = True, active: np.ndarray | None = None) -> list[dict]:
        """Step every (active) env; returns the new transitions (for a replay buffer).

        With ``continue_=False`` a finished env is not reset and ``self.done[i]`` is set;
        otherwise it begins its next episode under ``choose(i)``.
        """
        new = []
        for i, env in enumerate(self.envs):
            if active is not None and not active[i]:
                continue
            obs2, _, term, trunc, info = env.step(actions[i])
            self._t[i] += 1
            timeout = bool(trunc) or self._t[i] >= self.horizon
            row = {
                "obs": self._obs[i].copy(), "act": np.clip(actions[i], -1, 1), "obs2": obs2,
                "cost": info["cost"], "term": bool(term), "timeout": timeout and not term,
                "feats": info["features"], "t": self._t[i] - 1, "goal_id": self._cond[i][0],
                "lam": self._cond[i][1], "noise": self._cond[i][2], "source": source,
            }
            self._running[i].append(row)
            new.append(row)
            self._obs[i] = obs2
            if term or timeout:
                self._flush(i)
                if continue_:
                    self.begin(i, choose(i))
                else:
                    self.done[i] = True
        return new

    def _flush(self, i: int) -> None:
        if self._running[i]:
            self.episodes.append(_stack_rows(self._running[i], self.spec.feature_names))
        self._running[i] = []

    def flush_all(self) -> None:
        """Close running episodes (marked as timeouts at their last step)."""
        for i in range(self.n_envs):
            if self._running[i]:
                self._running[i][-1]["timeout"] = not self._running[i][-1]["term"]
                self._flush(i)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _stack_rows(rows: list[dict], feature_names) -> dict[str, np.ndarray]:
    # Per-step records of one episode -> the dataset's columns, (T,) / (T, d) arrays.
    out = {
        "observations": np.stack([r["obs"] for r in rows]).astype(np.float32),
        "actions": np.stack([r["act"] for r in rows]).astype(np.float32),
        "next_observations": np.stack([r["obs2"] for r in rows]).astype(np.float32),
        "costs": np.array([r["cost"] for r in rows], dtype=np.float32),
        "terminals": np.array([r["term"] for r in rows], dtype=bool),
        "timeouts": np.array([r["timeout"] for r in rows], dtype=bool),
        "timesteps": np.array([r["t"] for r in rows], dtype=np.int32),
        "goal_ids": np.array([r["goal_id"] for r in rows], dtype=np.int16),
        "penalties": np.array([r["lam"] for r in rows], dtype=np.float32),
        "noise": np.array([r["noise"] for r in rows], dtype=np.float32),
        "source": np.array([r["source"] for r in rows], dtype=np.int8),
    }
    for k in feature_names:
        out["feat__" + k] = np.array([r["feats"][k] for r in rows], dtype=np.float64)
    return out
