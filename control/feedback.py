"""Synthetic feedback from behaviour datasets: crowd preferences and PRESA feedback.

A *segment* is a window of ``segment_length`` consecutive steps inside one episode; it is
stored as the dataset row index of its first step (``chosen`` / ``rejected`` columns hold
these start rows). ``segment_rows(starts, L)`` gives the (B, L) rows, ``gather_segments``
the observations and actions.

- Crowd preferences (Safe-CPL / Safe-VPL, Lin & Brown): ``n_query_sets`` query sets of
  ``set_size`` segment pairs; each set is labelled by ONE user u on the score
  ``sum_t r_u(s_t, a_t) - penalty * sum_t c_t`` (penalty 10: safety is shared by the crowd).
  Labels are deterministic (argmax) or Boltzmann-rational,
  ``P(sigma_1 > sigma_2) = sigmoid(beta (score_1 - score_2))`` (the Bradley–Terry model of
  ``llm_safepref.core.losses.bradley_terry_loss``, whose negative log it is), then flipped
  with probability ``label_noise``. ``user_weights`` sets how often each user labels a set (group imbalance).
- PRESA feedback: pairs preferred by cumulative reward of one goal (no cost), labelled the
  same way (argmax or Boltzmann with ``beta``, flipped with ``label_noise``), plus a binary
  safety label per segment: safe iff its cumulative cost <= ``cost_threshold`` (default the
  episode budget kappa pro-rated to the segment, ``kappa * L / T``). Safety labels are never
  flipped: ``label_noise`` is preference noise.
- Statistics (:func:`dataset_statistics`) bin the episodes of every user goal by the exact
  lambda of their behaviour policy (SAC's 0 and 10, the gait search's -10, 0 and 10), so
  every goal-directed episode falls in exactly one bin.

Column vocabulary shared with the token-level datasets (``llm_safepref.core.schema``):
``chosen``, ``rejected``, ``chosen_is_safe``, ``rejected_is_safe``, ``user_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from control.data import Dataset, DataError
from llm_safepref.core.losses import bradley_terry_loss
from llm_safepref.core.schema import CHOSEN, CHOSEN_IS_SAFE, REJECTED, REJECTED_IS_SAFE, USER_ID

__all__ = [
    "CrowdFeedbackConfig",
    "PresaFeedbackConfig",
    "default_crowd_config",
    "valid_segment_starts",
    "sample_segments",
    "segment_rows",
    "gather_segments",
    "segment_sums",
    "make_crowd_feedback",
    "make_presa_feedback",
    "validate_feedback",
    "segment_cost_threshold",
    "dataset_statistics",
    "penalty_key",
    "BUILD_RECORD_KEYS",
]


# --------------------------------------------------------------------------- segments


def valid_segment_starts(ds: Dataset, segment_length: int) -> np.ndarray:
    """Rows where a segment of ``segment_length`` steps fits inside one episode (sorted)."""
    if segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    starts = []
    for s, e in ds.episode_bounds():
        if e - s >= segment_length:
            starts.append(np.arange(s, e - segment_length + 1))
    if not starts:
        longest = int(np.max(np.diff(ds.episode_bounds(), axis=1))) if ds.n else 0
        raise DataError(
            f"{ds.meta.get('task')}: no episode is at least segment_length={segment_length} steps long "
            f"(longest has {longest}); use shorter segments or longer episodes"
        )
    return np.concatenate(starts)


def sample_segments(ds: Dataset, n: int, segment_length: int, rng: np.random.Generator,
                    valid: np.ndarray | None = None) -> np.ndarray:
    valid = valid_segment_starts(ds, segment_length) if valid is None else valid
    return valid[rng.integers(len(valid), size=n)]


def segment_rows(starts: np.ndarray, segment_length: int) -> np.ndarray:
    """(B,) start rows -> (B, L) row indices."""
    return np.asarray(starts, dtype=np.int64)[:, None] + np.arange(segment_length)[None, :]


def gather_segments(ds: Dataset, starts: np.ndarray, segment_length: int) -> dict[str, np.ndarray]:
    """Observations (B, L, obs_dim), actions (B, L, A), costs (B, L) of segments."""
    rows = segment_rows(starts, segment_length)
    return {k: ds[k][rows] for k in ("observations", "actions", "costs")}


def segment_sums(values: np.ndarray, starts: np.ndarray, segment_length: int) -> np.ndarray:
    """Sum of a per-row quantity (N,) over each segment: (B,). Uses a cumulative sum."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    starts = np.asarray(starts, dtype=np.int64)
    return c[starts + segment_length] - c[starts]


def segment_cost_threshold(ds: Dataset, segment_length: int) -> float:
    """Episode budget kappa pro-rated to a segment: ``kappa * L / T``."""
    return float(ds.spec.cost_threshold * segment_length / ds.meta["max_episode_steps"])


# --------------------------------------------------------------------------- labels


def _label(score_a: np.ndarray, score_b: np.ndarray, beta: float | None, noise: float,
           rng: np.random.Generator) -> np.ndarray:
    """True where segment a is preferred over b. Scores (B,) -> (B,) bool."""
    if beta is None:
        a_wins = score_a > score_b
        ties = score_a == score_b
        a_wins = np.where(ties, rng.random(len(score_a)) < 0.5, a_wins)
    else:
        # Boltzmann-rational labeller: P(a > b) = sigmoid(beta (s_a - s_b)) = exp(-L_BT(beta s_a, beta s_b)).
        r_a = torch.as_tensor(beta * np.asarray(score_a, dtype=np.float64))
        r_b = torch.as_tensor(beta * np.asarray(score_b, dtype=np.float64))
        p = torch.exp(-bradley_terry_loss(r_a, r_b)).numpy()
        a_wins = rng.random(len(score_a)) < p
    if noise > 0:
        a_wins = np.where(rng.random(len(score_a)) < noise, ~a_wins, a_wins)
    return a_wins


@dataclass
class CrowdFeedbackConfig:
    n_query_sets: int = field(default=5000, metadata={"help": "Query sets (one labelling user each)."})
    set_size: int = field(default=16, metadata={"help": "Segment pairs per query set."})
    segment_length: int = field(default=64, metadata={"help": "Steps per segment."})
    penalty: float = field(default=10.0, metadata={"help": "Shared cost penalty in every user's score."})
    beta: float | None = field(default=None, metadata={"help": "Boltzmann rationality; None = argmax labels."})
    label_noise: float = field(default=0.0, metadata={"help": "Probability of flipping each label."})
    user_weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Relative frequency of each user (imbalance); None = uniform."})
    seed: int = field(default=0, metadata={"help": "Sampling and labelling seed."})

    def __post_init__(self):
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be > 0 or None, got {self.beta}")
        if self.n_query_sets < 1 or self.set_size < 1 or self.segment_length < 1:
            raise ValueError("n_query_sets, set_size and segment_length must be >= 1")


def default_crowd_config(task: str, **overrides: Any) -> CrowdFeedbackConfig:
    """Lin & Brown's sizes: segment length 64, set size 16; Reach: segment 16, set size 32."""
    base: dict[str, Any] = {"segment_length": 16, "set_size": 32} if task == "reach" else {}
    base.update(overrides)
    return CrowdFeedbackConfig(**base)


def make_crowd_feedback(ds: Dataset, cfg: CrowdFeedbackConfig) -> dict[str, np.ndarray]:
    """Crowd preference pairs, (Q * K,) columns; see module docstring."""
    spec = ds.spec
    rng = np.random.default_rng(cfg.seed)
    weights = np.ones(spec.n_users) if cfg.user_weights is None else np.asarray(cfg.user_weights, float)
    if weights.shape != (spec.n_users,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"user_weights must be {spec.n_users} non-negative numbers, got {cfg.user_weights}")
    weights = weights / weights.sum()
    q, k, L = cfg.n_query_sets, cfg.set_size, cfg.segment_length
    valid = valid_segment_starts(ds, L)
    users = rng.choice(spec.n_users, size=q, p=weights)  # one labeller per query set
    a = sample_segments(ds, q * k, L, rng, valid)
    b = sample_segments(ds, q * k, L, rng, valid)
    user_id = np.repeat(users, k)
    cost_a, cost_b = segment_sums(ds["costs"], a, L), segment_sums(ds["costs"], b, L)
    # Each pair scored by its own labeller: reward of user u (column u) minus the shared penalty.
    ret_a = np.empty(q * k)
    ret_b = np.empty(q * k)
    for u in range(spec.n_users):
        m = user_id == u
        if m.any():
            ret_a[m] = segment_sums(ds["rewards"][:, u], a[m], L)
            ret_b[m] = segment_sums(ds["rewards"][:, u], b[m], L)
    score_a, score_b = ret_a - cfg.penalty * cost_a, ret_b - cfg.penalty * cost_b
    a_wins = _label(score_a, score_b, cfg.beta, cfg.label_noise, rng)
    pick = lambda x, y: np.where(a_wins, x, y)  # noqa: E731
    thr = segment_cost_threshold(ds, L)
    out = {
        CHOSEN: pick(a, b).astype(np.int64),
        REJECTED: pick(b, a).astype(np.int64),
        USER_ID: user_id.astype(np.int64),
        "query_set_id": np.repeat(np.arange(q), k).astype(np.int64),
        "chosen_return": pick(ret_a, ret_b),
        "rejected_return": pick(ret_b, ret_a),
        "chosen_cost": pick(cost_a, cost_b),
        "rejected_cost": pick(cost_b, cost_a),
        "segment_length": np.array(L),
    }
    out[CHOSEN_IS_SAFE] = out["chosen_cost"] <= thr
    out[REJECTED_IS_SAFE] = out["rejected_cost"] <= thr
    validate_feedback(out, ds)
    return out


@dataclass
class PresaFeedbackConfig:
    n_pairs: int = field(default=5000, metadata={"help": "Segment pairs."})
    segment_length: int = field(default=64, metadata={"help": "Steps per segment."})
    goal_id: int = field(default=0, metadata={"help": "User goal whose reward defines the preference."})
    cost_threshold: float | None = field(
        default=None, metadata={"help": "Segment is safe iff cumulative cost <= this; None = kappa * L / T."})
    beta: float | None = field(default=None, metadata={"help": "Boltzmann rationality; None = argmax labels."})
    label_noise: float = field(default=0.0, metadata={"help": "Flip probability of preference labels."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be > 0 or None, got {self.beta}")
        if self.n_pairs < 1 or self.segment_length < 1:
            raise ValueError("n_pairs and segment_length must be >= 1")


def make_presa_feedback(ds: Dataset, cfg: PresaFeedbackConfig) -> dict[str, np.ndarray]:
    """Reward preferences + per-segment binary safety labels, (P,) columns."""
    spec = ds.spec
    spec.user_goal(cfg.goal_id)  # raises on an unknown goal id
    rng = np.random.default_rng(cfg.seed)
    L = cfg.segment_length
    valid = valid_segment_starts(ds, L)
    a, b = sample_segments(ds, cfg.n_pairs, L, rng, valid), sample_segments(ds, cfg.n_pairs, L, rng, valid)
    r = ds["rewards"][:, cfg.goal_id]
    ret_a, ret_b = segment_sums(r, a, L), segment_sums(r, b, L)
    cost_a, cost_b = segment_sums(ds["costs"], a, L), segment_sums(ds["costs"], b, L)
    a_wins = _label(ret_a, ret_b, cfg.beta, cfg.label_noise, rng)  # preference ignores cost
    thr = segment_cost_threshold(ds, L) if cfg.cost_threshold is None else cfg.cost_threshold
    pick = lambda x, y: np.where(a_wins, x, y)  # noqa: E731
    out = {
        CHOSEN: pick(a, b).astype(np.int64),
        REJECTED: pick(b, a).astype(np.int64),
        USER_ID: np.full(cfg.n_pairs, cfg.goal_id, dtype=np.int64),
        "chosen_return": pick(ret_a, ret_b),
        "rejected_return": pick(ret_b, ret_a),
        "chosen_cost": pick(cost_a, cost_b),
        "rejected_cost": pick(cost_b, cost_a),
        "segment_length": np.array(L),
        "cost_threshold": np.array(thr),
    }
    out[CHOSEN_IS_SAFE] = out["chosen_cost"] <= thr
    out[REJECTED_IS_SAFE] = out["rejected_cost"] <= thr
    validate_feedback(out, ds)
    return out


def validate_feedback(fb: dict[str, np.ndarray], ds: Dataset, source: str = "feedback") -> None:
    """Raise :class:`DataError` for mismatched lengths, out-of-episode segments, unknown users."""
    for k in (CHOSEN, REJECTED, USER_ID, "segment_length"):
        if k not in fb:
            raise DataError(f"{source}: missing column '{k}'")
    L = int(fb["segment_length"])
    n = len(fb[CHOSEN])
    for k, v in fb.items():
        if np.ndim(v) >= 1 and len(v) != n:
            raise DataError(f"{source}: column '{k}' has {len(v)} rows but 'chosen' has {n}; lengths must match")
    ep = ds["episode_ids"]
    for k in (CHOSEN, REJECTED):
        s = np.asarray(fb[k], dtype=np.int64)
        end = s + L - 1
        bad = (s < 0) | (end >= ds.n)
        bad[~bad] = ep[s[~bad]] != ep[end[~bad]]
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: column '{k}' row {r}: segment starting at dataset row {int(s[r])} is shorter than "
                f"segment_length={L} inside its episode (it runs past the episode end or the dataset)"
            )
    uid = np.asarray(fb[USER_ID])
    bad = (uid < 0) | (uid >= ds.spec.n_users)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: column 'user_id' row {r} has goal id {int(uid[r])}, which does not exist; "
                        f"expected 0..{ds.spec.n_users - 1}")


# --------------------------------------------------------------------------- statistics


def _summary(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {"n": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": float(x.max())}


def penalty_key(lam: float) -> str:
    """Bin name of a behaviour policy's lambda in the statistics: ``penalty0``, ``penalty10``, ``penalty-10``."""
    return f"penalty{float(lam):g}"


#: Run-record fields of a dataset's build (``llm_safepref.core.provenance.run_record``) kept in its statistics.
BUILD_RECORD_KEYS = ("command", "git_revision", "versions", "lock_sha256", "machine", "date", "created_utc",
                     "build_seconds", "scale", "seed", "format")


def dataset_statistics(ds: Dataset, segment_length: int = 64) -> dict[str, Any]:
    """Return and cost distributions per user goal and the fraction of unsafe segments.

    Segments here are the non-overlapping windows of ``segment_length`` in every episode; a
    segment is unsafe when its cumulative cost exceeds ``kappa * L / T``. The episodes of
    each user goal are also split by the exact lambda of their behaviour policy
    (``..._own_episodes_penalty<lambda>``, one bin per lambda in the dataset, listed in
    ``penalties``): every episode of a goal is in exactly one bin. The build's run record
    (``BUILD_RECORD_KEYS``, None where an older build lacks one) is copied from its metadata.
    """
    spec = ds.spec
    bounds = ds.episode_bounds()
    lengths = bounds[:, 1] - bounds[:, 0]
    starts = np.concatenate([np.arange(s, e - segment_length + 1, segment_length) for s, e in bounds])
    seg_cost = segment_sums(ds["costs"], starts, segment_length) if len(starts) else np.zeros(0)
    thr = segment_cost_threshold(ds, segment_length)
    ep_cost = np.add.reduceat(ds["costs"].astype(np.float64), bounds[:, 0])  # (E,)
    ep_goal = ds["goal_ids"][bounds[:, 0]]
    ep_pen = ds["penalties"][bounds[:, 0]].astype(np.float64)
    penalties = sorted(set(ep_pen.tolist()))
    per_goal = {}
    for u in range(spec.n_users):
        ret_u = np.add.reduceat(ds["rewards"][:, u].astype(np.float64), bounds[:, 0])
        mine = ep_goal == u
        entry = {
            "goal": spec.user_goals[u].tolist(),
            "return_own_episodes": _summary(ret_u[mine]),
            "cost_own_episodes": _summary(ep_cost[mine]),
        }
        for lam in penalties:
            entry[f"return_own_episodes_{penalty_key(lam)}"] = _summary(ret_u[mine & (ep_pen == lam)])
        for lam in penalties:
            entry[f"cost_own_episodes_{penalty_key(lam)}"] = _summary(ep_cost[mine & (ep_pen == lam)])
        entry["return_all_episodes_relabelled"] = _summary(ret_u)
        per_goal[str(u)] = entry
    return {
        "task": spec.name,
        "env_id": spec.env_id,
        "n_transitions": ds.n,
        "n_episodes": int(len(bounds)),
        "episode_length": _summary(lengths.astype(float)),
        "segment_length": segment_length,
        "segment_cost_threshold": thr,
        "n_segments": int(len(starts)),
        "unsafe_segment_fraction": float(np.mean(seg_cost > thr)) if len(starts) else float("nan"),
        "any_cost_segment_fraction": float(np.mean(seg_cost > 0)) if len(starts) else float("nan"),
        "step_cost_rate": float(ds["costs"].mean()),
        "episode_cost": _summary(ep_cost),
        "penalties": penalties,
        "per_goal": per_goal,
        **{k: ds.meta.get(k) for k in BUILD_RECORD_KEYS},
    }
