"""Deduplication and leakage-free train / validation / test splits by prompt.

1. Exact duplicates: prompts equal after lower-casing and removing punctuation/whitespace.
2. Near duplicates: cosine similarity of MiniLM embeddings ≥ ``dedup_threshold`` (0.92); the
   first prompt in source-priority order is kept.
3. Paraphrase groups: connected components of the graph "cosine ≥ ``group_threshold``" (0.80);
   whole groups go to one split, so no test prompt has a close paraphrase in training.
4. Groups are ordered by a seeded hash and filled into splits by the given fractions.
5. Extra links (``paraphrase_groups(..., links=)``) join rows that must share a split whatever
   their cosine: a safety-v3 look-dangerous prompt and its harmful contrast twin.

All functions are pure (embeddings are passed in), so tests can use any vectors.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

__all__ = ["normalise", "exact_dedup", "near_dedup", "paraphrase_groups", "assign_splits", "SPLITS"]

SPLITS = ("train", "validation", "test")


def normalise(text: str) -> str:
    return re.sub(r"[\W_]+", " ", str(text).lower()).strip()


def exact_dedup(rows: list[dict], key: str = "prompt") -> list[dict]:
    """Keep the first row of each normalised prompt."""
    seen, out = set(), []
    for r in rows:
        k = normalise(r[key])
        if k and k not in seen:
            seen.add(k)
            out.append(r)
    return out


def near_dedup(emb: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool keep-mask: drop a row when an earlier kept row has cosine ≥ threshold.

    ``emb`` (N, D) must be L2-normalised. Greedy in row order, O(N²/block) memory-light.
    """
    n = len(emb)
    keep = np.ones(n, dtype=bool)
    sims = emb @ emb.T  # (N, N); N ≤ a few thousand here
    for i in range(n):
        if not keep[i]:
            continue
        dup = np.flatnonzero(sims[i, i + 1 :] >= threshold) + i + 1
        keep[dup] = False
    return keep


def paraphrase_groups(emb: np.ndarray, threshold: float, links=()) -> np.ndarray:
    """(N,) int group ids: connected components of the cosine ≥ threshold graph (union-find).

    ``links``: extra ``(i, j)`` row pairs that belong together whatever their cosine (the
    safety-v3 prompt twins).
    """
    n = len(emb)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    sims = emb @ emb.T
    ii, jj = np.nonzero(np.triu(sims >= threshold, k=1))
    for a, b in [*zip(ii.tolist(), jj.tolist()), *((int(i), int(j)) for i, j in links)]:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.asarray([find(i) for i in range(n)])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def assign_splits(group_keys: list[str], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split name per row; rows sharing a group key share a split.

    Groups are shuffled by ``sha256(seed, key)`` and filled in order until each split holds
    its fraction of *rows*; deterministic for a seed, independent of row order.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    sizes: dict[str, int] = {}
    for k in group_keys:
        sizes[k] = sizes.get(k, 0) + 1
    order = sorted(sizes, key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).hexdigest())
    total = len(group_keys)
    bounds = np.cumsum(fractions) * total
    split_of, filled = {}, 0
    for k in order:
        # A group goes to the first split whose quota its midpoint falls within.
        mid = filled + sizes[k] / 2
        idx = int(np.searchsorted(bounds, mid, side="right"))
        split_of[k] = SPLITS[min(idx, 2)]
        filled += sizes[k]
    return [split_of[k] for k in group_keys]
