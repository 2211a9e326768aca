"""Fast-gait search for the velocity tasks whose speed limits SAC does not reach at `small` scale.

Why: at the `small` budget the goal-conditioned SAC of ``control.data`` learns no gait for
Ant and Swimmer that crosses their speed limits, so the data held almost no unsafe behaviour
(the measured fractions and their commands: ``docs/control.md``, "The `small` build"). This module finds fast, goal-directed gaits by the cross-entropy method
(CEM; Rubinstein, 1999) over a small closed-loop central-pattern-generator (CPG) controller,
evaluated only by real simulator rollouts; every evaluation rollout is kept as data.

Controller (per action dimension j, env step t, time step dt, goal direction theta_g):

    a_j = clip(b_j + A_j * tanh(3 sin(2 pi f t dt + phi_j)) + k_j * sin(psi - theta_g), -1, 1)

``psi`` is the body's heading read from the observation (Swimmer: the front segment's
angle ``obs[0]``; Ant: the torso yaw from its quaternion ``obs[1:5]``), so ``k_j`` can steer
towards the goal direction. Parameters ``p`` (D = 1 + 4 A): frequency ``f = 0.5 + 4 |p_0|``
Hz, amplitudes ``|p_1..A|`` (clipped to 1.5), phases ``pi p``, biases, steering gains.

CEM objective for user goal g with penalty lambda: mean over the rollout of
``g . v_xy - lambda * cost`` (lambda = 0: as fast as possible along g, which crosses the
speed limit; lambda = 10: fast but within the limit; lambda = -10: cost-seeking, moving along
g while breaking the limit as often as it can), with early termination (Ant falling
over) charged as zero progress for the remaining steps.

Rollouts go through ``control.collection.BatchCollector`` (search rollouts ``source`` 2,
best-gait rollouts ``source`` 3), so they are dataset episodes like the SAC data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from control import tool_command
from control.collection import BatchCollector
from control.tasks import get_spec
from llm_safepref.core.cli import ToolParser
from llm_safepref.core.provenance import run_record

__all__ = ["GaitConfig", "heading", "cpg_actions", "n_gait_params", "search_gaits"]


@dataclass
class GaitConfig:
    iters: int = field(default=12, metadata={"help": "CEM iterations per (user goal, lambda)."})
    population: int = field(default=12, metadata={"help": "Candidate gaits per CEM iteration."})
    elites: int = field(default=3, metadata={"help": "Best candidates that refit the CEM Gaussian."})
    horizon: int = field(default=200, metadata={"help": "Steps of each evaluation rollout (>= segment length)."})
    penalties: tuple[float, ...] = field(default=(0.0, 10.0), metadata={"help": "lambda of the CEM objectives."})
    final_episodes: int = field(default=1, metadata={"help": "Full-length rollouts of the best gait per noise level."})
    noise_levels: tuple[float, ...] = field(default=(0.1, 0.3), metadata={"help": "Action-noise stds of final rollouts."})
    keep: str = field(default="elites", metadata={"help": "Search rollouts kept as data: 'elites' (each "
                                                          "iteration's elite rollouts) or 'all'."})
    swim_iters: int = field(default=0, metadata={"help": "CEM iterations of a goal-free pre-search scoring the net "
                                                         "planar speed in any direction (0 = none)."})
    warm_start: bool = field(default=True, metadata={"help": "Start every per-goal CEM from the pre-search's best gait "
                                                             "(else the first search's): the wave transfers, steering "
                                                             "adapts."})
    init_std: float = field(default=0.5, metadata={"help": "Initial CEM standard deviation."})
    min_std: float = field(default=0.05, metadata={"help": "Floor on the CEM standard deviation."})

    def __post_init__(self):
        if not 1 <= self.elites <= self.population:
            raise ValueError(f"elites ({self.elites}) must be in [1, population ({self.population})]")
        if self.iters < 1 or self.horizon < 1:
            raise ValueError("iters and horizon must be >= 1")
        if self.keep not in ("elites", "all"):
            raise ValueError(f"keep must be 'elites' or 'all', got {self.keep!r}")


def heading(task: str, obs: np.ndarray) -> np.ndarray:
    """Body heading (yaw, radians) from observations (n, obs_dim) -> (n,)."""
    obs = np.atleast_2d(obs)
    if task == "swimmer_vel":
        return obs[:, 0]  # qpos[2]: angle of the front segment
    if task == "ant_vel":
        w, x, y, z = obs[:, 1], obs[:, 2], obs[:, 3], obs[:, 4]  # torso quaternion (qpos[3:7])
        return np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    raise ValueError(f"no heading for task {task!r}; gait search supports ant_vel and swimmer_vel")


def n_gait_params(act_dim: int) -> int:
    return 1 + 4 * act_dim


def cpg_actions(params: np.ndarray, t: np.ndarray, psi: np.ndarray, theta_g: np.ndarray, dt: float) -> np.ndarray:
    """CPG actions. params (n, 1 + 4A), t (n,) steps, psi / theta_g (n,) radians -> (n, A)."""
    params = np.atleast_2d(params)
    a_dim = (params.shape[1] - 1) // 4
    f = 0.5 + 4.0 * np.abs(params[:, :1])  # (n, 1) Hz
    amp = np.clip(np.abs(params[:, 1:1 + a_dim]), 0.0, 1.5)
    phase = np.pi * params[:, 1 + a_dim:1 + 2 * a_dim]
    bias = params[:, 1 + 2 * a_dim:1 + 3 * a_dim]
    steer = params[:, 1 + 3 * a_dim:1 + 4 * a_dim]
    wave = np.tanh(3.0 * np.sin(2 * np.pi * f * (np.asarray(t)[:, None] * dt) + phase))
    err = np.sin(np.asarray(psi) - np.asarray(theta_g))[:, None]
    return np.clip(bias + amp * wave + steer * err, -1.0, 1.0)


def search_gaits(task: str, cfg: GaitConfig, n_envs: int, seed: int, rng: np.random.Generator,
                 log: Callable[[str], None] | None = None, final_horizon: int | None = None,
                 goal_ids: list[int] | None = None):
    """CEM gait search for every user goal x lambda; returns (episodes, best params, summary).

    Episodes are ``BatchCollector`` episode dicts: search rollouts have ``source`` 2 and noise 0;
    rollouts of each best gait (full task horizon, Gaussian action noise) have ``source`` 3.
    """
    log = log or (lambda s: None)
    col = BatchCollector(task, n_envs, seed + 2, cfg.horizon)
    spec = col.spec
    act_dim = col.act_dim
    dt = col.dt
    dim = n_gait_params(act_dim)
    best: dict[tuple[int, float], np.ndarray] = {}
    summary: dict[str, dict] = {}

    def run(collector, plan, params, noise):
        """Roll out plan[k] = (goal_id, lam, noise) with params[k] -> (scores (K,), episode of each k)."""
        scores = np.zeros(len(plan))
        episode_of: list[dict | None] = [None] * len(plan)
        for start in range(0, len(plan), n_envs):
            chunk = list(range(start, min(start + n_envs, len(plan))))
            collector.begin_batch([plan[k] for k in chunk])
            acc = np.zeros(n_envs)
            vsum = np.zeros((n_envs, 2))  # summed planar velocity (goal-free swim objective)
            p = np.zeros((n_envs, dim))
            p[:len(chunk)] = params[chunk]
            goals = np.zeros((n_envs, 2))
            lam = np.zeros(n_envs)
            sd = np.zeros((n_envs, 1))
            free = np.zeros(n_envs, dtype=bool)
            for i, k in enumerate(chunk):
                free[i] = plan[k][0] < 0  # goal-free: steer towards +x, score net speed in any direction
                goals[i] = (1.0, 0.0) if free[i] else spec.user_goals[plan[k][0]]
                lam[i], sd[i, 0] = plan[k][1], noise[k]
            theta = np.arctan2(goals[:, 1], goals[:, 0])
            while not collector.done.all():
                a = cpg_actions(p, collector.timesteps.astype(float), heading(task, collector.obs), theta, dt)
                a = np.clip(a + sd * rng.standard_normal(a.shape), -1, 1)
                active = ~collector.done
                n0 = len(collector.episodes)
                rows = collector.step(a, None, source=collector_source, continue_=False, active=active)
                # Finished envs flush their episodes in env order: map them back to plan entries.
                for i, ep in zip(np.flatnonzero(active & collector.done), collector.episodes[n0:]):
                    episode_of[chunk[i]] = ep
                for i, r in zip(np.flatnonzero(active), rows):
                    f = r["feats"]
                    acc[i] += goals[i, 0] * f["vx"] + goals[i, 1] * f["vy"] - lam[i] * r["cost"]
                    vsum[i] += (f["vx"], f["vy"])
            horizon = collector.horizon
            for i, k in enumerate(chunk):
                # Early termination: remaining steps count as 0.
                scores[k] = (np.hypot(*vsum[i]) if free[i] else acc[i]) / horizon
        return scores, episode_of

    collector_source = 2
    search_eps: list[dict] = []
    conditions = [(u, lam) for u in (range(spec.n_users) if goal_ids is None else goal_ids) for lam in cfg.penalties]
    swim = None
    if cfg.swim_iters > 0:
        conditions = [(-1, 0.0)] + conditions  # goal-free pre-search: learn to swim first
    for u, lam in conditions:
        mu = np.zeros(dim)
        mu[0], mu[1:1 + act_dim] = 0.25, 0.8
        if cfg.warm_start and swim is not None:
            mu = swim.copy()
        elif cfg.warm_start and best:
            mu = next(iter(best.values())).copy()
        sd = np.full(dim, cfg.init_std)
        top_p, top_s = mu.copy(), -np.inf
        for it in range(cfg.swim_iters if u < 0 else cfg.iters):
            cand = mu + sd * rng.standard_normal((cfg.population, dim))
            plan = [(u, lam, 0.0)] * cfg.population
            sc, eps_k = run(col, plan, cand, np.zeros(cfg.population))
            order = np.argsort(sc)[::-1]
            kept = order[:cfg.elites] if cfg.keep == "elites" else np.arange(cfg.population)
            search_eps.extend(eps_k[k] for k in sorted(kept.tolist()))
            el = cand[order[:cfg.elites]]
            mu, sd = el.mean(0), np.maximum(el.std(0), cfg.min_std)
            if sc[order[0]] > top_s:
                top_s, top_p = float(sc[order[0]]), cand[order[0]].copy()
        if u < 0:
            swim = top_p
            summary["goal_free_swim"] = {"best_score": top_s}
            log(f"[{task}] goal-free pre-search: best net speed {top_s:.3f}")
            continue
        best[(u, lam)] = top_p
        summary[f"goal{u}_lambda{lam:g}"] = {"best_score": top_s}
        log(f"[{task}] gait search goal {u} lambda {lam:g}: best objective {top_s:.3f}")
    col.close()

    # Full-length rollouts of each best gait with action noise.
    collector_source = 3
    colf = BatchCollector(task, n_envs, seed + 3, final_horizon)
    plan, params, noise = [], [], []
    for (u, lam), p in best.items():
        for sd_ in cfg.noise_levels:
            for _ in range(cfg.final_episodes):
                plan.append((u, lam, sd_)); params.append(p); noise.append(sd_)
    if plan:
        run(colf, plan, np.asarray(params), np.asarray(noise))
    final_eps = list(colf.episodes)  # all kept
    colf.close()
    return search_eps + final_eps, best, summary


def main(argv=None) -> int:
    """Probe: ``python -m control.gaits --task ant_vel --goals 0 ...`` prints what the gait search reaches.

    Output: JSON lines, the run record first, then one line per (rollout kind, condition).
    """
    p = ToolParser(prog="python -m control.gaits", description=main.__doc__)
    p.add_argument("--task", required=True, choices=["ant_vel", "swimmer_vel"], help="velocity task")
    p.add_argument("--goals", type=int, nargs="+", default=None, help="user goal ids (default: all)")
    p.add_argument("--iters", type=int, default=20, help="CEM iterations per (goal, lambda)")
    p.add_argument("--population", type=int, default=16, help="candidate gaits per iteration")
    p.add_argument("--elites", type=int, default=4, help="candidates that refit the CEM Gaussian")
    p.add_argument("--horizon", type=int, default=400, help="steps of each search rollout")
    p.add_argument("--penalties", type=float, nargs="+", default=[0.0], help="lambda of the objectives")
    p.add_argument("--final_horizon", type=int, default=1000, help="steps of the best gaits' rollouts")
    p.add_argument("--n_envs", type=int, default=4, help="envs stepped in lockstep")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    args = p.parse_args(argv)
    print(json.dumps({"run_record": run_record(command=tool_command("control.gaits", argv))}))
    spec = get_spec(args.task)
    cfg = GaitConfig(iters=args.iters, population=args.population, elites=args.elites, horizon=args.horizon,
                     penalties=tuple(args.penalties), noise_levels=(0.0,))
    eps, best, summary = search_gaits(args.task, cfg, args.n_envs, args.seed, np.random.default_rng(args.seed),
                                      log=print, final_horizon=args.final_horizon, goal_ids=args.goals)
    seg_thr = spec.cost_threshold * 64 / spec.max_episode_steps
    for src, name in ((2, "search elites"), (3, "best gait, full episode, no noise")):
        rows = {}
        for e in (e for e in eps if e["source"][0] == src):
            key = f"goal{int(e['goal_ids'][0])}_lambda{float(e['penalties'][0]):g}"
            rows.setdefault(key, []).append(e)
        for key, group in rows.items():
            g = spec.user_goals[int(group[0]["goal_ids"][0])]
            vx = np.concatenate([e["feat__vx"] for e in group])
            vy = np.concatenate([e["feat__vy"] for e in group])
            cost = np.concatenate([e["costs"] for e in group])
            segs = [e["costs"][i:i + 64].sum() > seg_thr for e in group for i in range(0, len(e["costs"]) - 63, 64)]
            speed = np.hypot(vx, vy)
            print(json.dumps({"rollouts": name, "condition": key, "steps": int(len(vx)),
                              "progress_mean": round(float(np.mean(g[0] * vx + g[1] * vy)), 4),
                              "speed_p50_p99_max": [round(float(x), 3) for x in np.percentile(speed, [50, 99, 100])],
                              "step_cost_rate": round(float(cost.mean()), 4),
                              "unsafe_segment_fraction": round(float(np.mean(segs)), 4) if segs else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
