"""Statistics every results file needs: intervals over prompts / episodes, paired comparisons,
mean ± std over seeds, and judge-error correction. numpy and the standard library only.

Design decisions:

* A rate over prompts gets a **Wilson score** interval (:func:`wilson_interval`): it stays
  inside [0, 1] and is honest at 0 or 1 successes, where the normal interval collapses.
  Any other mean over prompts or episodes gets a **percentile bootstrap** (:func:`bootstrap_ci`).
* Two models on the *same* prompts are compared on per-prompt differences
  (:func:`paired_bootstrap`, and :func:`mcnemar_exact` for two binary outcomes).
* Across training seeds the unit of replication is the seed: :func:`two_level_bootstrap`
  resamples seeds, then prompts within them, so prompts of different seeds are never pooled
  as if they were independent draws; two methods on shared prompts use the same prompt
  resample (:func:`two_level_paired_bootstrap`).
* Judged rates can be corrected for the judge's measured sensitivity and specificity
  (:func:`rogan_gladen`); the interval propagates the audit set's uncertainty by a
  parametric bootstrap, and a correction that leaves [0, 1] is reported as clipped bounds.
* Every resampling function takes a ``seed``: the same inputs give the same interval.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "CONFIDENCE",
    "wilson_interval",
    "rate_summary",
    "bootstrap_ci",
    "paired_bootstrap",
    "mcnemar_exact",
    "mean_std",
    "seed_summary",
    "two_level_bootstrap",
    "two_level_paired_bootstrap",
    "rogan_gladen",
    "rogan_gladen_ci",
]

#: The confidence level of every interval the toolkit writes (``<metric>_ci``).
CONFIDENCE = 0.95
_N_RESAMPLES = 10_000


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_summary(flags: Sequence[bool] | np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """``{"rate", "ci", "n"}`` of a sequence of 0/1 outcomes (Wilson interval)."""
    flags = np.asarray(flags, dtype=bool)
    k, n = int(flags.sum()), int(flags.size)
    low, high = wilson_interval(k, n, confidence)
    return {"rate": (k / n) if n else math.nan, "ci": [low, high], "n": n}


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(0 if seed is None else seed)


def _percentile_ci(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return (float(low), float(high))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = _N_RESAMPLES,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)`` (resampling the values)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    _z(confidence)
    idx = _rng(seed).integers(0, values.size, size=(n_resamples, values.size))
    if statistic is np.mean:
        samples = values[idx].mean(axis=1)
    else:
        samples = np.array([statistic(values[row]) for row in idx])
    return _percentile_ci(samples, confidence)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = _N_RESAMPLES,
    seed: int | None = 0,
) -> dict:
    """Paired comparison of two models on the same prompts (``a[i]``, ``b[i]`` on prompt ``i``).

    Returns ``{"diff", "ci", "p_value", "n"}``: the mean difference ``a - b``, its bootstrap
    interval, and a two-sided bootstrap p-value (twice the share of resampled differences on
    the far side of 0, capped at 1).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    d = a - b
    if d.size == 0:
        return {"diff": math.nan, "ci": [math.nan, math.nan], "p_value": math.nan, "n": 0}
    idx = _rng(seed).integers(0, d.size, size=(n_resamples, d.size))
    samples = d[idx].mean(axis=1)
    return {"diff": float(d.mean()), "ci": list(_percentile_ci(samples, confidence)),
            "p_value": _two_sided_p(samples), "n": int(d.size)}


def _two_sided_p(samples: np.ndarray) -> float:
    below, above = float((samples <= 0).mean()), float((samples >= 0).mean())
    return min(1.0, 2 * min(below, above))


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> dict:
    """Exact McNemar test of two paired binary outcomes.

    ``{"a_only", "b_only", "p_value"}``: the discordant counts and the two-sided exact
    binomial p-value of ``a_only`` among the discordant pairs under p = 1/2.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def mean_std(values: Sequence[float] | np.ndarray) -> dict:
    """``{"mean", "std", "n"}`` over seeds; ``std`` is the sample standard deviation (ddof 1, 0 for one seed)."""
    values = np.asarray(values, dtype=float)
    n = int(values.size)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if n > 1 else 0.0, "n": n}


def seed_summary(per_seed: Sequence[Sequence[float]], *, confidence: float = CONFIDENCE,
                 n_resamples: int = _N_RESAMPLES, seed: int | None = 0) -> dict:
    """Mean ± std over seeds of per-prompt outcomes plus the two-level interval.

    ``per_seed[s]`` holds seed ``s``'s per-prompt values. Returns ``{"mean", "std", "ci",
    "n_seeds", "n_prompts"}`` with ``mean`` / ``std`` over the seeds' means.
    """
    m = _as_matrix(per_seed)
    ms = mean_std(m.mean(axis=1))
    return {"mean": ms["mean"], "std": ms["std"],
            "ci": list(two_level_bootstrap(per_seed, confidence=confidence, n_resamples=n_resamples, seed=seed)),
            "n_seeds": ms["n"], "n_prompts": int(m.shape[1])}


def _as_matrix(per_seed: Sequence[Sequence[float]]) -> np.ndarray:
    rows = [np.asarray(v, dtype=float) for v in per_seed]
    if not rows:
        raise ValueError("need at least one seed")
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"every seed must be scored on the same prompts, got sizes {[r.size for r in rows]}")
    return np.stack(rows)  # (S, P)


def _two_level_samples(m: np.ndarray, rng: np.random.Generator, n_resamples: int,
                       prompt_idx: np.ndarray | None = None) -> np.ndarray:
    S, P = m.shape
    seed_idx = rng.integers(0, S, size=(n_resamples, S))
    if prompt_idx is None:
        prompt_idx = rng.integers(0, P, size=(n_resamples, P))
    # Mean over resampled seeds of each seed's mean over the resampled prompts.
    per_seed_means = m[:, prompt_idx].mean(axis=2).T  # (S, R, P) -> (R, S)
    return np.take_along_axis(per_seed_means, seed_idx, axis=1).mean(axis=1)


def two_level_bootstrap(per_seed: Sequence[Sequence[float]], *, confidence: float = CONFIDENCE,
                        n_resamples: int = _N_RESAMPLES, seed: int | None = 0) -> tuple[float, float]:
    """Interval of the seed-mean of per-prompt outcomes: resample seeds, then prompts.

    ``per_seed`` is ``(S, P)``: ``S`` training seeds scored on the same ``P`` prompts. The
    prompt resample is shared by the seeds of one replicate (they saw the same prompts).
    """
    m = _as_matrix(per_seed)
    return _percentile_ci(_two_level_samples(m, _rng(seed), n_resamples), confidence)


def two_level_paired_bootstrap(a_per_seed: Sequence[Sequence[float]], b_per_seed: Sequence[Sequence[float]], *,
                               confidence: float = CONFIDENCE, n_resamples: int = _N_RESAMPLES,
                               seed: int | None = 0) -> dict:
    """Difference of two methods' seed-means on shared prompts: ``{"diff", "ci", "p_value"}``.

    Seeds are resampled independently per method (their training runs are independent);
    prompts are resampled once per replicate and shared by both methods (paired).
    """
    a, b = _as_matrix(a_per_seed), _as_matrix(b_per_seed)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"both methods must be scored on the same prompts, got {a.shape[1]} and {b.shape[1]}")
    rng = _rng(seed)
    prompt_idx = rng.integers(0, a.shape[1], size=(n_resamples, a.shape[1]))
    samples = _two_level_samples(a, rng, n_resamples, prompt_idx) - _two_level_samples(b, rng, n_resamples, prompt_idx)
    return {"diff": float(a.mean() - b.mean()), "ci": list(_percentile_ci(samples, confidence)),
            "p_value": _two_sided_p(samples)}


def rogan_gladen(apparent_rate: float, sensitivity: float, specificity: float) -> float:
    """True-prevalence estimate ``(p + sp - 1) / (se + sp - 1)`` (Rogan & Gladen, 1978), unclipped.

    Undefined (``nan``) when ``se + sp <= 1`` (a judge no better than chance).
    """
    youden = sensitivity + specificity - 1
    if youden <= 0:
        return math.nan
    return (apparent_rate + specificity - 1) / youden


def rogan_gladen_ci(
    positives: int, n: int, *, true_positives: int, n_positive: int, true_negatives: int, n_negative: int,
    confidence: float = CONFIDENCE, n_resamples: int = _N_RESAMPLES, seed: int | None = 0,
) -> dict:
    """Judge-corrected rate with an interval that includes the audit set's uncertainty.

    ``positives / n`` is the judged rate on the evaluation prompts; the judge's sensitivity
    is ``true_positives / n_positive`` and specificity ``true_negatives / n_negative`` on the
    audit set. A parametric bootstrap redraws all three binomials (Jeffreys-smoothed).
    Returns ``{"rate", "ci", "clipped"}``: the point estimate and interval clipped to [0, 1],
    ``clipped`` true when the unclipped estimate left [0, 1] (then the figures are bounds).
    """
    rng = _rng(seed)
    se = true_positives / n_positive if n_positive else math.nan
    sp = true_negatives / n_negative if n_negative else math.nan
    point = rogan_gladen(positives / n, se, sp) if n else math.nan

    def draw(k, m):  # Beta(k + 1/2, m - k + 1/2): the Jeffreys posterior of a binomial proportion
        return rng.beta(k + 0.5, m - k + 0.5, size=n_resamples)

    p, se_s, sp_s = draw(positives, n), draw(true_positives, n_positive), draw(true_negatives, n_negative)
    youden = se_s + sp_s - 1
    ok = youden > 0
    samples = (p[ok] + sp_s[ok] - 1) / youden[ok]
    if samples.size == 0 or not math.isfinite(point):
        return {"rate": math.nan, "ci": [math.nan, math.nan], "clipped": False}
    low, high = _percentile_ci(samples, confidence)
    clipped = not 0.0 <= point <= 1.0
    clip = lambda x: float(min(1.0, max(0.0, x)))  # noqa: E731
    return {"rate": clip(point), "ci": [clip(low), clip(high)], "clipped": clipped}
