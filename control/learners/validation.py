"""Did a run's validation return level off? The learning-curve check behind "undertrained" in the table.

Design decisions:

- Input: the ``{"step", "event": "validation", "eval/normalized_reward", ...}`` lines that
  ``control.learners.base.run_learner`` writes every ``validate_every`` steps (DSRL-normalised
  reward on held-out downstream goals that are not the final evaluation's). A log is read
  with :func:`read_validation` (half-written lines of a killed run are skipped; a resume's
  rewritten lines replace the old ones: the last line of each step counts).
- Criterion (:func:`levelled_off`), on the curve ``v_1..v_n`` at steps ``s_1..s_n``:
  the *tail* is the last quarter of the points, at least 3 (``ceil(n / 4)``); its least-squares
  slope times its step span is the tail's *rise*. The curve has levelled off when
  ``rise <= max(rel_tol * (max v - min v), abs_tol)``: over its last quarter it still rises by
  at most 10% of the range the whole curve covered, or by at most 0.02 (2% of the
  DSRL reward reference's span) for a flat curve. A falling tail counts as levelled off
  (training longer would not raise it). With fewer than ``min_points`` = 4 points the answer
  is ``None`` (unknown: no validation, or too few to say).
- The verdict is computed when a run finishes and stored in its run file (``validation``),
  so the table needs no work folder; ``control.suite.aggregate`` falls back to the log when a
  run file predates the field, and marks a (task, method) "undertrained" when any of its seeds
  did not level off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from llm_safepref.core.schema import Metric

__all__ = ["VALIDATION_EVENT", "read_validation", "validation_curve", "levelled_off", "summarize_validation",
           "CRITERION"]

VALIDATION_EVENT = "validation"
#: The criterion in words (written into run files and the table).
CRITERION = ("levelled off when the least-squares rise of the validation DSRL reward over the last quarter of its "
             "points (>= 3) is <= max(0.1 x the curve's range, 0.02)")


def read_validation(log_path: str | Path) -> list[dict[str, Any]]:
    """The validation lines of a run's ``log.jsonl``, by step (the last line of a step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(log_path)
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line half-written when the process was killed
            continue
        if isinstance(row, dict) and row.get("event") == VALIDATION_EVENT and "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def validation_curve(rows: Iterable[Mapping[str, Any]], key: str = Metric.EVAL_NORMALIZED_REWARD
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(steps (n,), values (n,)) of ``key`` over validation rows, finite values only, by step."""
    pts = sorted((int(r["step"]), float(r[key])) for r in rows
                 if r.get("event", VALIDATION_EVENT) == VALIDATION_EVENT and isinstance(r.get(key), (int, float))
                 and math.isfinite(r[key]))
    return np.array([p[0] for p in pts], dtype=np.float64), np.array([p[1] for p in pts], dtype=np.float64)


def levelled_off(steps: Sequence[float], values: Sequence[float], *, tail: float = 0.25, min_points: int = 4,
                 rel_tol: float = 0.1, abs_tol: float = 0.02) -> dict[str, Any]:
    """The module docstring's criterion: ``{"levelled_off": bool | None, "n_points", "tail_points",
    "tail_rise", "range", "tolerance"}`` (``None`` values when there are too few points)."""
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps and values must be two 1-d arrays of one length, got {s.shape} and {v.shape}")
    n = len(v)
    out: dict[str, Any] = {"levelled_off": None, "n_points": n, "tail_points": None, "tail_rise": None,
                           "range": None, "tolerance": None}
    if n < max(min_points, 3):
        return out
    k = max(3, math.ceil(tail * n))
    ts, tv = s[-k:], v[-k:]
    dx = ts - ts.mean()
    slope = float((dx * (tv - tv.mean())).sum() / max((dx ** 2).sum(), 1e-12))  # least squares
    rise = slope * float(ts[-1] - ts[0])
    spread = float(v.max() - v.min())
    tol = max(rel_tol * spread, abs_tol)
    out.update(levelled_off=bool(rise <= tol), tail_points=k, tail_rise=rise, range=spread, tolerance=tol)
    return out


def summarize_validation(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What a run file keeps: the curve ``points`` ``[[step, reward, cost], ...]`` and the verdict."""
    rows = [r for r in rows if r.get("event") == VALIDATION_EVENT]
    steps, values = validation_curve(rows)
    costs = {int(r["step"]): r.get(Metric.EVAL_NORMALIZED_COST) for r in rows}
    return {"points": [[int(st), float(val), costs.get(int(st))] for st, val in zip(steps, values)],
            **levelled_off(steps, values), "criterion": CRITERION}
