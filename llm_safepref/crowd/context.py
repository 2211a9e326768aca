"""Context sets: for each example, a few *other* annotated pairs of the same user.

Safe-CPL's encoder infers a user's latent ``z`` from a set of that user's annotated pairs
(Poddar et al. 2024, VPL; Lin & Brown 2026): each training example ``(user, pair)`` comes with a
context set of ``K ∈ [k_min, k_max]`` pairs drawn from the user's pool.

Design decisions:

* **Per-example determinism.** The draw for an example depends only on ``(seed, user_id,
  pair_id)`` and on the user's pool (as a set), never on row order or on the other examples: a
  shuffled, filtered or sharded dataset draws the same context for the same pair.
* **No leakage.** The example's own pair is never in its context, nor any other pair on the
  *same prompt* (it would share a response with the example, and reveal the answer).
* **Uniform.** ``K`` is uniform on ``[k_min, k_max]``; the pairs are a uniform random subset of
  the eligible pool: the draw permutes the whole pool implicitly by sampling ``K + e`` distinct
  positions (``e`` = number of excluded pairs) and keeps the first ``K`` eligible ones, which is
  uniform over eligible subsets and costs ``O(K + e)`` per example.
* **Errors, not silent shrinking.** A user whose eligible pool is smaller than ``k_max`` for
  some example raises, naming the user, the counts and the ``context_size`` argument.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

__all__ = ["CONTEXT_COLUMN", "ContextError", "add_context_sets", "context_rows", "draw_context_sets", "pair_index", "parse_context_size"]

CONTEXT_COLUMN = "context_pair_ids"


class ContextError(ValueError):
    """A context set cannot be drawn (pool too small, duplicate pair ids)."""


def parse_context_size(context_size) -> tuple[int, int]:
    """``int`` K or ``(k_min, k_max)`` -> ``(k_min, k_max)`` with ``1 <= k_min <= k_max``."""
    if isinstance(context_size, int):
        lo = hi = context_size
    else:
        try:
            lo, hi = (int(v) for v in context_size)
        except (TypeError, ValueError):
            raise ContextError(f"context_size must be an int or a (min, max) pair, got {context_size!r}") from None
    if not 1 <= lo <= hi:
        raise ContextError(f"context_size needs 1 <= min <= max, got {(lo, hi)}")
    return lo, hi


def _rng(seed: int, user_id: str, pair_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{user_id}\x00{pair_id}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def draw_context_sets(user_ids, pair_ids, prompt_keys, *, context_size=(2, 8), seed: int = 0) -> list[list[str]]:
    """For every row, the pair ids of its context set (a list of ``K`` ids, in draw order).

    ``user_ids``, ``pair_ids``, ``prompt_keys``: one entry per row (``prompt_keys`` identify the
    prompt, e.g. ``prompt_id``; pairs on the row's prompt are excluded). ``pair_ids`` must be
    unique.
    """
    k_min, k_max = parse_context_size(context_size)
    user_ids, pair_ids, prompt_keys = [str(u) for u in user_ids], [str(p) for p in pair_ids], list(prompt_keys)
    if not len(user_ids) == len(pair_ids) == len(prompt_keys):
        raise ContextError(f"got {len(user_ids)} user ids, {len(pair_ids)} pair ids, {len(prompt_keys)} prompt keys")
    seen = set()
    for p in pair_ids:
        if p in seen:
            raise ContextError(f"pair id {p!r} occurs more than once; context sets need unique pair ids")
        seen.add(p)
    pool: dict[str, list[str]] = defaultdict(list)  # user -> sorted pair ids (the order is part of the draw)
    prompt_of: dict[str, object] = {}
    by_prompt: dict[tuple, list[str]] = defaultdict(list)  # (user, prompt) -> pair ids
    for u, p, k in zip(user_ids, pair_ids, prompt_keys):
        pool[u].append(p)
        prompt_of[p] = k
        by_prompt[(u, k)].append(p)
    for u in pool:
        pool[u].sort()
    out = []
    for u, p, k in zip(user_ids, pair_ids, prompt_keys):
        ids = pool[u]
        excluded = set(by_prompt[(u, k)])  # includes the row's own pair
        eligible = len(ids) - len(excluded)
        if eligible < k_max:
            raise ContextError(
                f"user {u!r} has {len(ids)} pairs, of which {eligible} are on other prompts than pair {p!r}: "
                f"fewer than the context size {k_max} (argument context_size={(k_min, k_max)}); lower context_size "
                f"or give this user more annotated pairs")
        rng = _rng(seed, u, p)
        size = rng.randint(k_min, k_max)
        picks = rng.sample(range(len(ids)), min(len(ids), size + len(excluded)))
        out.append([ids[i] for i in picks if ids[i] not in excluded][:size])
    return out


def add_context_sets(ds, *, context_size=(2, 8), seed: int = 0, user_column: str = "user_id",
                     pair_column: str = "pair_id", prompt_column: str | None = None):
    """A ``datasets.Dataset`` with a ``context_pair_ids`` column (list of str) drawn per row.

    ``prompt_column``: the column that identifies a prompt (default ``prompt_id`` when present,
    else ``prompt``; message lists are compared by their text).
    """
    for col, arg in ((user_column, "user_column"), (pair_column, "pair_column")):
        if col not in ds.column_names:
            raise ContextError(f"no column {col!r} (argument {arg}); found {ds.column_names}")
    if prompt_column is None:
        prompt_column = "prompt_id" if "prompt_id" in ds.column_names else "prompt"
    if prompt_column not in ds.column_names:
        raise ContextError(f"no column {prompt_column!r} (argument prompt_column); found {ds.column_names}")
    keys = [_key(v) for v in ds[prompt_column]]
    sets = draw_context_sets(ds[user_column], ds[pair_column], keys, context_size=context_size, seed=seed)
    if CONTEXT_COLUMN in ds.column_names:
        ds = ds.remove_columns(CONTEXT_COLUMN)
    return ds.add_column(CONTEXT_COLUMN, sets)


def _key(value) -> str:
    if isinstance(value, list):  # conversational prompt
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def pair_index(ds, *, pair_column: str = "pair_id") -> dict[str, int]:
    """``{pair_id: row}`` of a dataset (build once, pass to ``context_rows``)."""
    return {str(p): i for i, p in enumerate(ds[pair_column])}


def context_rows(ds, index: int, *, row_of: dict[str, int] | None = None, pair_column: str = "pair_id") -> list[dict]:
    """The context rows of row ``index`` (a dataset with ``context_pair_ids``), in draw order.

    ``row_of``: ``pair_index(ds)``, computed here when not given (O(N): pass it in loops).
    """
    if CONTEXT_COLUMN not in ds.column_names:
        raise ContextError(f"no column {CONTEXT_COLUMN!r}: call add_context_sets first")
    row_of = row_of if row_of is not None else pair_index(ds, pair_column=pair_column)
    return [ds[row_of[p]] for p in ds[index][CONTEXT_COLUMN]]
