"""Behaviour datasets for the six tasks: build, save, load, validate, cache.

How a dataset is built (``build_dataset``):
1. One SAC agent per task, conditioned on (user goal, penalty lambda in {0, 10}), is trained
   online for ``train_steps`` environment steps on ``n_envs`` batched envs, with hindsight
   relabelling of goal and lambda (see ``control.policies``). Every training transition is
   kept: early random motion, then increasingly competent safe (lambda = 10) and unsafe
   (lambda = 0) skills.
2. The final agent is rolled out for every user goal x lambda x action-noise level
   (``rollout_episodes`` episodes each), adding Gaussian noise to the mean action.
3. Tasks in ``GAIT_TASKS`` (Ant, Swimmer) add a CEM search over closed-loop CPG gaits per user
   goal x lambda (``control.gaits``): SAC at the `small` budget learns no gait that crosses
   their speed limit. Besides lambda 0 and 10 the search runs lambda = -10, a *cost-seeking*
   behaviour policy (progress along the goal + 10 x cost), so that every user goal has unsafe
   segments. The elite rollouts of every CEM iteration and noisy rollouts of each best gait
   are kept.

File format (``<dir>/<task>__<scale>__seed<seed>.npz`` + ``.json`` with the same stem):
- ``observations``, ``next_observations`` (N, obs_dim) float32; ``actions`` (N, A) float32
  in [-1, 1];
- ``costs`` (N,) float32 true per-step cost; ``rewards`` (N, U) float32: the reward of every
  user goal (column u = user u), recomputable from the features;
- ``feat__<name>`` (N,) float64: per-step features for relabelling with
  ``TaskSpec.reward(features, goal)``;
- ``terminals`` (N,) bool (true termination), ``timeouts`` (N,) bool (episode cut by the
  time limit or end of collection); ``episode_ids`` (N,) int64, contiguous and increasing;
  ``timesteps`` (N,) int32;
- ``goal_ids`` (N,) int16 user goal assigned to the episode (during the uniform-random warm-up
  the actions ignore it; -1 is accepted for goal-free data),
  ``penalties`` (N,) float32 lambda of the behaviour policy, ``noise`` (N,) float32 action
  noise std, ``source`` (N,) int8 (0 = online training, 1 = final-policy rollouts,
  2 = gait-search rollouts, 3 = rollouts of the best gaits; 2 and 3 only for ``GAIT_TASKS``).
The JSON holds provenance: task, scale, seed, format version, the run record of
``llm_safepref.core.provenance.run_record`` (command, git revision, library versions, lock
hash, machine, date), ``created_utc``, user goals, feature names, the scale and SAC configs,
and the gait-search summary. It is written by ``llm_safepref.core.provenance.write_json``
(atomic, secrets redacted). Both behaviour learners collect through
``control.collection.BatchCollector``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from control.collection import BatchCollector
from control.gaits import GaitConfig, search_gaits
from control.policies import PENALTIES, SAC, SACConfig
from control.tasks import TaskSpec, get_spec
from llm_safepref.core.paths import cache_root
from llm_safepref.core.provenance import current_command, run_record, write_json

__all__ = [
    "VERSION",
    "ScaleConfig",
    "SCALES",
    "scale_config",
    "Dataset",
    "build_dataset",
    "load_or_build",
    "build_and_cache",
    "save_dataset",
    "load_dataset",
    "validate_dataset",
    "dataset_path",
    "default_data_dir",
    "DataError",
    "GAIT_TASKS",
    "gait_config",
]

VERSION = "control-data-2"  # bump when the format or the build procedure changes


class DataError(ValueError):
    """Malformed dataset or feedback: the message names file, row/column and expectation."""


@dataclass
class ScaleConfig:
    train_steps: int = field(metadata={"help": "Online SAC environment steps (all envs together)."})
    warmup_steps: int = field(metadata={"help": "Uniform-random steps before learning starts."})
    n_envs: int = field(default=4, metadata={"help": "Envs stepped in lockstep with one batched policy call."})
    updates_per_step: float = field(default=0.5, metadata={"help": "SAC gradient steps per environment step."})
    hidden: int = field(default=128, metadata={"help": "Width of the SAC MLPs."})
    batch_size: int = field(default=256, metadata={"help": "SAC batch size."})
    horizon: int | None = field(default=None, metadata={"help": "Episode length cap; None = the task's own."})
    rollout_episodes: int = field(default=2, metadata={"help": "Final rollouts per user goal x lambda x noise."})
    noise_levels: tuple[float, ...] = field(default=(0.1, 0.3), metadata={"help": "Action-noise stds of rollouts."})

    def __post_init__(self):
        if self.train_steps < self.warmup_steps:
            raise ValueError(f"train_steps ({self.train_steps}) < warmup_steps ({self.warmup_steps})")
        if self.n_envs < 1 or self.rollout_episodes < 0:
            raise ValueError("n_envs must be >= 1 and rollout_episodes >= 0")


# Per-scale defaults; some tasks need more steps to learn fast (unsafe) gaits.
_SMALL_STEPS = {"reach": 40_000, "run": 20_000, "circle": 30_000, "ant_vel": 100_000,
                "swimmer_vel": 60_000, "halfcheetah_vel": 100_000}
_PAPER_STEPS = {k: 10 * v for k, v in _SMALL_STEPS.items()}

SCALES = ("smoke", "small", "paper")


def scale_config(task: str, scale: str) -> ScaleConfig:
    """The build settings for (task, scale).

    smoke: seconds (tests); small: the budget of the kept `small` build (its build times and
    command: ``docs/control.md``, "The `small` build"); paper: 10x the small SAC budget.
    """
    get_spec(task)
    if scale == "smoke":
        return ScaleConfig(train_steps=400, warmup_steps=200, n_envs=2, updates_per_step=0.05, hidden=32,
                           batch_size=64, horizon=80, rollout_episodes=1, noise_levels=(0.3,))
    if scale == "small":
        return ScaleConfig(train_steps=_SMALL_STEPS[task], warmup_steps=5_000, n_envs=4, updates_per_step=0.5)
    if scale == "paper":
        return ScaleConfig(train_steps=_PAPER_STEPS[task], warmup_steps=10_000, n_envs=8, updates_per_step=1.0,
                           hidden=256, rollout_episodes=20, noise_levels=(0.0, 0.1, 0.3, 0.5))
    raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")


# Tasks whose behaviour data add a CEM search over closed-loop CPG gaits (control.gaits):
# SAC at the `small` budget learns no Ant or Swimmer gait fast enough to cross the speed limit.
GAIT_TASKS = ("ant_vel", "swimmer_vel")


def gait_config(task: str, scale: str) -> GaitConfig | None:
    """The gait-search settings for (task, scale), or None when the task has no gait stage."""
    if task not in GAIT_TASKS:
        return None
    if scale == "smoke":
        return GaitConfig(iters=1, population=2, elites=1, horizon=70, penalties=(0.0,), noise_levels=(0.3,),
                          swim_iters=1)
    if scale == "small":
        # lambda = -10 (cost-seeking: progress + 10 x cost) is what reliably crosses the speed limit
        # for every user goal; lambda 0 alone left too few unsafe segments (control-data-1; the
        # measurements and their commands: docs/control.md, "Gait search").
        if task == "ant_vel":
            # Ant: short 100-step search rollouts (violent gaits flip the Ant; a long horizon scores
            # them 0) and a larger search (the probe that chose them: docs/control.md, "Gait search").
            return GaitConfig(iters=40, population=32, elites=6, horizon=100, penalties=(-10.0, 0.0, 10.0),
                              noise_levels=(0.0, 0.1, 0.3), swim_iters=20)
        return GaitConfig(iters=20, population=16, elites=4, horizon=400, penalties=(-10.0, 0.0, 10.0),
                          noise_levels=(0.0, 0.1, 0.3), swim_iters=30)
    if scale == "paper":
        return GaitConfig(iters=40, population=24, elites=6, horizon=500, final_episodes=5, swim_iters=60,
                          noise_levels=(0.0, 0.1, 0.3, 0.5))
    raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")


# Swimmer needs a long effective horizon to learn to swim fast (MuJoCo lore: gamma ~ 0.999).
_GAMMA = {"swimmer_vel": 0.999}
# SAC reward scale during training only (stored rewards are unscaled): Swimmer's speeds (its
# limit is 0.2282) make rewards too small next to the entropy bonus.
_REWARD_SCALE = {"swimmer_vel": 10.0}


# --------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """Arrays (see module docstring) + metadata. ``features`` view for ``TaskSpec.reward``."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def spec(self) -> TaskSpec:
        return get_spec(self.meta["task"])

    @property
    def n(self) -> int:
        return int(len(self.arrays["actions"]))

    @property
    def features(self) -> dict[str, np.ndarray]:
        return {k[len("feat__"):]: v for k, v in self.arrays.items() if k.startswith("feat__")}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def reward_for(self, goal) -> np.ndarray:
        """Relabel every transition for any goal (N,)."""
        return self.spec.reward(self.features, self.spec.check_goal(goal)).astype(np.float32)

    def episode_bounds(self) -> np.ndarray:
        """(E, 2) [start, end) row ranges of episodes (episodes are contiguous)."""
        ids = self.arrays["episode_ids"]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        return np.stack([starts, ends], 1)


def _concat_episodes(episodes: list[dict[str, np.ndarray]], spec: TaskSpec) -> dict[str, np.ndarray]:
    keys = episodes[0].keys()
    arrays = {k: np.concatenate([e[k] for e in episodes]) for k in keys}
    arrays["episode_ids"] = np.concatenate(
        [np.full(len(e["actions"]), i, dtype=np.int64) for i, e in enumerate(episodes)]
    )
    feats = {k[len("feat__"):]: v for k, v in arrays.items() if k.startswith("feat__")}
    arrays["rewards"] = np.stack([spec.reward(feats, g) for g in spec.user_goals], 1).astype(np.float32)
    return arrays


def build_dataset(task: str, scale: str = "smoke", seed: int = 0, *, command: str | None = None,
                  log: Callable[[str], None] | None = None, config: ScaleConfig | None = None,
                  gait: GaitConfig | str | None = "auto") -> Dataset:
    """Train the behaviour agent and collect the dataset for (task, scale, seed). See module doc.

    ``gait``: a ``control.gaits.GaitConfig`` to add a gait-search stage, None for none, or
    "auto" (default) for ``gait_config(task, scale)``. ``command``: the command line recorded
    in the run record (default: this process's).
    """
    spec = get_spec(task)
    cfg = config or scale_config(task, scale)
    log = log or (lambda s: None)
    rng = np.random.default_rng(seed)
    t_start = time.time()
    col = BatchCollector(task, cfg.n_envs, seed, cfg.horizon)
    obs_dim, act_dim = col.obs_dim, col.act_dim
    sac_cfg = SACConfig(hidden=cfg.hidden, batch_size=cfg.batch_size, gamma=_GAMMA.get(task, 0.99))
    agent = SAC(obs_dim, spec.goal_dim + 1, act_dim, sac_cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def choose_train(i: int):
        return int(rng.integers(spec.n_users)), float(rng.choice(PENALTIES)), -1.0  # noise -1: SAC sampling

    # Replay buffer: growing lists of arrays; features kept as an (N, F) matrix.
    rb_obs, rb_act, rb_obs2, rb_feat, rb_cost, rb_nd = [], [], [], [], [], []
    col.start(choose_train)
    total, n_updates, last_log, update_debt = 0, 0, 0, 0.0
    stats: dict[str, float] = {}
    while total < cfg.train_steps:
        if total < cfg.warmup_steps:
            actions = rng.uniform(-1, 1, size=(cfg.n_envs, act_dim))
        else:
            x = np.concatenate([col.obs, col.conds()], 1)
            actions = agent.actor.act(x, deterministic=False, generator=gen)
        rows = col.step(actions, choose_train, source=0)
        for r in rows:
            rb_obs.append(r["obs"]); rb_act.append(r["act"]); rb_obs2.append(r["obs2"])
            rb_feat.append([r["feats"][k] for k in spec.feature_names]); rb_cost.append(r["cost"])
            rb_nd.append(0.0 if r["term"] else 1.0)
        total += len(rows)
        if total >= cfg.warmup_steps:
            update_debt += cfg.updates_per_step * len(rows)
            n = len(rb_obs)
            while update_debt >= 1.0:
                update_debt -= 1.0
                idx = rng.integers(n, size=cfg.batch_size)
                gid = rng.integers(spec.n_users, size=cfg.batch_size)
                lam = rng.choice(PENALTIES, size=cfg.batch_size)
                feats = np.asarray([rb_feat[j] for j in idx])
                fdict = {k: feats[:, c] for c, k in enumerate(spec.feature_names)}
                cost = np.asarray([rb_cost[j] for j in idx])
                r = spec.reward(fdict, spec.user_goals[gid]) - lam * cost  # hindsight relabel (B,)
                r = r * _REWARD_SCALE.get(task, 1.0)
                cond = np.concatenate([spec.user_goals[gid] / col.goal_scale, lam[:, None] / 10.0], 1)
                x = np.concatenate([np.asarray([rb_obs[j] for j in idx]), cond], 1)
                x2 = np.concatenate([np.asarray([rb_obs2[j] for j in idx]), cond], 1)
                tt = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float32)  # noqa: E731
                stats = agent.update(tt(x), tt([rb_act[j] for j in idx]), tt(r), tt(x2), tt([rb_nd[j] for j in idx]))
                n_updates += 1
        if total - last_log >= max(cfg.train_steps // 20, 1):
            last_log = total
            recent = col.episodes[-16:]

            def _mean(key, lam):
                v = [e[key].sum() if key == "costs" else
                     spec.reward({k[6:]: e[k] for k in e if k.startswith("feat__")},
                                 spec.user_goals[e["goal_ids"][0]]).sum()
                     for e in recent if e["goal_ids"][0] >= 0 and e["penalties"][0] == lam]
                return float(np.mean(v)) if v else float("nan")

            log(f"[{task}] step {total}/{cfg.train_steps} updates {n_updates} episodes {len(col.episodes)} "
                f"recent return/cost lambda=0: {_mean('rewards', 0.0):.1f}/{_mean('costs', 0.0):.1f} "
                f"lambda=10: {_mean('rewards', 10.0):.1f}/{_mean('costs', 10.0):.1f} "
                f"alpha {stats.get('alpha', float('nan')):.3f} ({time.time() - t_start:.0f}s)")
    col.flush_all()
    n_train_eps = len(col.episodes)

    # Final-policy rollouts: every user goal x lambda x noise level, rollout_episodes each.
    conds = [(u, lam, sd) for u in range(spec.n_users) for lam in PENALTIES for sd in cfg.noise_levels]
    plan = [c for c in conds for _ in range(cfg.rollout_episodes)]
    col_r = BatchCollector(task, cfg.n_envs, seed + 1, cfg.horizon)  # envs reused across chunks
    for start in range(0, len(plan), cfg.n_envs):
        chunk = plan[start:start + cfg.n_envs]
        col_r.begin_batch(chunk)
        sd = np.zeros((cfg.n_envs, 1))
        sd[: len(chunk), 0] = [c[2] for c in chunk]
        while not col_r.done.all():
            x = np.concatenate([col_r.obs, col_r.conds()], 1)
            mean = agent.actor.act(x, deterministic=True)
            actions = np.clip(mean + sd * rng.standard_normal(mean.shape), -1, 1)
            col_r.step(actions, None, source=1, continue_=False, active=~col_r.done)
    col.episodes.extend(col_r.episodes)
    col_r.close()
    col.close()

    # Gait search (some tasks only, see GAIT_TASKS): CEM over CPG gaits per user goal x lambda.
    gcfg = gait_config(task, scale) if isinstance(gait, str) and gait == "auto" else gait
    gait_summary = None
    if gcfg is not None:
        t_g = time.time()
        eps, best, gait_summary = search_gaits(task, gcfg, cfg.n_envs, seed, rng, log=log,
                                               final_horizon=cfg.horizon)
        col.episodes.extend(eps)
        gait_summary = {"config": dataclasses.asdict(gcfg), "results": gait_summary,
                        "best_params": {k_: v_.tolist() for k_, v_ in
                                        ((f"goal{u}_lambda{lam:g}", p) for (u, lam), p in best.items())},
                        "seconds": round(time.time() - t_g, 1)}

    arrays = _concat_episodes(col.episodes, spec)
    meta = {
        "format": VERSION,
        "task": task,
        "scale": scale,
        "seed": seed,
        **run_record(command=command if command is not None else current_command()),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(time.time() - t_start, 1),
        "env_id": spec.env_id,
        "user_goals": spec.user_goals.tolist(),
        "feature_names": list(spec.feature_names),
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "max_episode_steps": cfg.horizon or spec.max_episode_steps,
        "n_transitions": int(len(arrays["actions"])),
        "n_episodes": len(col.episodes),
        "n_train_episodes": n_train_eps,
        "sac_updates": n_updates,
        "scale_config": dataclasses.asdict(cfg),
        "sac_config": dataclasses.asdict(sac_cfg),
        "penalties": list(PENALTIES),
        "gait_search": gait_summary,
    }
    ds = Dataset(arrays, meta)
    validate_dataset(ds, source=f"built {task}/{scale}/seed{seed}")
    return ds


def build_and_cache(task: str, scale: str, seed: int, data_dir, force: bool, threads: int, command: str) -> str:
    """Build (or load from cache) one dataset; used by the CLI, also in worker processes."""
    torch.set_num_threads(threads)
    t0 = time.time()
    path = dataset_path(task, scale, seed, data_dir)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if force:
        ds = build_dataset(task, scale, seed, command=command, log=log)
        save_dataset(ds, path)
    else:
        ds = load_or_build(task, scale, seed, data_dir, command=command, log=log)
    msg = f"[{task}] {ds.n} transitions, {ds.meta['n_episodes']} episodes -> {path} ({time.time() - t0:.0f}s)"
    print(msg, flush=True)
    return msg


# --------------------------------------------------------------------------- I/O


def default_data_dir() -> Path:
    """``<cache root>/control_data`` (``llm_safepref.core.paths.cache_root``: ``$LLM_SAFEPREF_CACHE``, ...)."""
    return cache_root() / "control_data"


def dataset_path(task: str, scale: str, seed: int, data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / f"{task}__{scale}__seed{seed}.npz"


def save_dataset(ds: Dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **ds.arrays)
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), ds.meta)
    return path


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"dataset {path} (and its {meta_path.name}) not found")
    meta = json.loads(meta_path.read_text())
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    ds = Dataset(arrays, meta)
    validate_dataset(ds, source=str(path))
    return ds


def load_or_build(task: str, scale: str, seed: int = 0, data_dir: str | Path | None = None, *,
                  command: str | None = None, log=None) -> Dataset:
    """Cached by (task, scale, seed) and the format version."""
    path = dataset_path(task, scale, seed, data_dir)
    if path.exists():
        ds = load_dataset(path)
        if ds.meta.get("format") == VERSION:
            return ds
    ds = build_dataset(task, scale, seed, command=command, log=log)
    save_dataset(ds, path)
    return ds


_REQUIRED = ("observations", "actions", "next_observations", "costs", "terminals", "timeouts", "episode_ids",
             "timesteps", "goal_ids", "rewards")


def validate_dataset(ds: Dataset, source: str = "dataset") -> None:
    """Raise :class:`DataError` naming the column/row when the data are malformed."""
    a, meta = ds.arrays, ds.meta
    if "task" not in meta:
        raise DataError(f"{source}: metadata has no 'task'")
    try:
        spec = get_spec(meta["task"])
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None
    missing = [k for k in _REQUIRED if k not in a]
    missing += ["feat__" + k for k in spec.feature_names if "feat__" + k not in a]
    if missing:
        raise DataError(f"{source}: missing columns {missing}")
    n = len(a["actions"])
    for k, v in a.items():
        if len(v) != n:
            raise DataError(f"{source}: column '{k}' has {len(v)} rows but 'actions' has {n}; lengths must match")
    for k in ("observations", "next_observations", "actions", "costs", "rewards"):
        bad = ~np.isfinite(a[k].reshape(n, -1)).all(1)
        if bad.any():
            raise DataError(f"{source}: column '{k}' has a NaN/inf at row {int(np.flatnonzero(bad)[0])} "
                            f"({int(bad.sum())} rows); expected finite values")
    if a["rewards"].shape[1:] != (spec.n_users,):
        raise DataError(f"{source}: column 'rewards' has shape {a['rewards'].shape}, expected (N, {spec.n_users})")
    gid = a["goal_ids"]
    bad = (gid < -1) | (gid >= spec.n_users)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: column 'goal_ids' row {r} has goal id {int(gid[r])}, which does not exist; "
                        f"expected -1 (random warm-up) or 0..{spec.n_users - 1}")
    ep = a["episode_ids"]
    if n and np.any(np.diff(ep) < 0):
        r = int(np.flatnonzero(np.diff(ep) < 0)[0]) + 1
        raise DataError(f"{source}: column 'episode_ids' decreases at row {r}; episodes must be contiguous")
