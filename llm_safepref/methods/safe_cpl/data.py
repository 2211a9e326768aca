"""Context sets of a Safe-CPL dataset: checks, the draw, and the index columns the trainer collates.

Every training example ``(user, pair)`` comes with a *context set*: ``K`` in
``[context_min, context_max]`` *other* annotated pairs of the same user, from which the
encoder infers that user's ``z``. Context pairs are rows of the same dataset (its pool).

Design decisions:

* The draw is :func:`llm_safepref.crowd.add_context_sets` (per-example deterministic: it
  depends on ``(seed, user, pair)`` only; never the example's own pair nor another pair on its
  prompt). A dataset that already has ``context_pair_ids`` (``load_crowd_dataset(...,
  context_size=...)``) keeps its draw, checked against the config.
* Bad input fails here, before anything is tokenised or embedded, with the dataset, the row,
  the user and the config field (and its recipe flag) to change: a missing user column
  (``user_column`` / ``--user_column``), a user with fewer pairs than a context set needs
  (``context_max`` / ``--context_max``), a context set that names an unknown pair, another
  user's pair or the example itself.
* The trainer collates two integer columns: :data:`CONTEXT_INDEX` (the ``K`` context rows as
  indices into the trainer's feature table, padded with ``-1`` to ``context_max``; an offset
  lets train and eval pools share one table) and :data:`EXAMPLE_INDEX` (the row index, which
  seeds the example's noise). Both are data, so they survive TRL's length filter, shuffling
  and sharding unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from llm_safepref.core import schema

__all__ = ["CONTEXT_INDEX", "EXAMPLE_INDEX", "ContextPool", "SafeCPLDataError", "prepare_context_dataset"]

#: ``(K_max,)`` int per row: feature-table rows of the context pairs, ``-1`` = padding.
CONTEXT_INDEX = "safe_cpl_context_index"
#: int per row: the row's index in its dataset (seeds its reparameterisation noise).
EXAMPLE_INDEX = "safe_cpl_example_index"
#: The crowd package's context column (pair ids) and pair-id column.
CONTEXT_PAIR_IDS = "context_pair_ids"
PAIR_ID = "pair_id"


class SafeCPLDataError(ValueError):
    """A dataset Safe-CPL cannot train on (the message names the row, the user and the fix)."""


@dataclass
class ContextPool:
    """The pairs of one dataset that context sets point into (one feature-table block)."""

    name: str
    prompts: list
    chosen: list
    rejected: list
    user_ids: list[str]
    offset: int  # first feature-table row of this pool

    def __len__(self) -> int:
        return len(self.prompts)


def _flag(field: str) -> str:
    return f"SafeCPLConfig.{field} (recipe flag --{field})"


def prepare_context_dataset(dataset, args, *, name: str, offset: int = 0):
    """``(dataset with CONTEXT_INDEX / EXAMPLE_INDEX columns, ContextPool)`` for one raw dataset.

    ``args`` is a :class:`~llm_safepref.methods.safe_cpl.config.SafeCPLConfig` (its
    ``user_column``, ``context_min`` / ``context_max`` and ``context_seed`` are used).
    """
    from datasets import Dataset

    from llm_safepref.crowd.context import ContextError, add_context_sets

    if not isinstance(dataset, Dataset):
        raise TypeError(f"{name} dataset: SafeCPLTrainer needs a datasets.Dataset (context sets index its rows), "
                        f"got {type(dataset).__name__}")
    display = f"{name} dataset"
    columns = list(dataset.column_names)
    user_column = args.user_column
    if user_column not in columns:
        raise SafeCPLDataError(
            f"{display}: no user column {user_column!r}; Safe-CPL needs the annotator of every pair. Name the column "
            f"with {_flag('user_column')}. Found columns: {columns}")
    missing = [c for c in schema.PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise SafeCPLDataError(f"{display}: missing column(s) {missing}; found {columns}")
    if len(dataset) == 0:
        raise SafeCPLDataError(f"{display}: it has no rows")

    users = dataset[user_column]
    for row, user in enumerate(users):
        if user is None or not str(user).strip():
            raise SafeCPLDataError(f"{display}: row {row}, column {user_column!r}: expected a non-empty user id, "
                                   f"got {user!r}")
    users = [str(u) for u in users]
    k_min, k_max = args.context_min, args.context_max
    counts = Counter(users)
    short = sorted((n, u) for u, n in counts.items() if n < k_max + 1)
    if short:
        listed = ", ".join(f"{u!r} ({n})" for n, u in short[:10])
        raise SafeCPLDataError(
            f"{display}: {len(short)} user(s) have fewer annotated pairs than a context set needs: {listed}. Each "
            f"example's context set holds up to context_max={k_max} OTHER pairs of the same user, so every user "
            f"needs at least {k_max + 1}. Lower {_flag('context_max')} (and context_min), or drop these users.")

    if PAIR_ID not in columns:
        dataset = dataset.add_column(PAIR_ID, [f"row{i:06d}" for i in range(len(dataset))])
    pair_ids = [str(p) for p in dataset[PAIR_ID]]
    row_of = {}
    for row, pid in enumerate(pair_ids):
        if pid in row_of:
            raise SafeCPLDataError(f"{display}: rows {row_of[pid]} and {row} share pair_id {pid!r}; context sets "
                                   "need unique pair ids")
        row_of[pid] = row

    if CONTEXT_PAIR_IDS not in columns:
        try:
            dataset = add_context_sets(dataset, context_size=(k_min, k_max), seed=args.context_seed,
                                       user_column=user_column, pair_column=PAIR_ID)
        except ContextError as err:
            raise SafeCPLDataError(f"{display}: {err}. The sizes come from {_flag('context_min')} and "
                                   f"{_flag('context_max')}") from err
    sets = dataset[CONTEXT_PAIR_IDS]
    index_rows = []
    for row, ids in enumerate(sets):
        ids = [str(p) for p in (ids or [])]
        if not k_min <= len(ids) <= k_max:
            raise SafeCPLDataError(
                f"{display}: row {row}: its context set has {len(ids)} pairs, outside [{k_min}, {k_max}] "
                f"({_flag('context_min')} / {_flag('context_max')}); drop the {CONTEXT_PAIR_IDS!r} column to redraw "
                "the sets, or match the sizes it was drawn with")
        rows = []
        for pid in ids:
            other = row_of.get(pid)
            if other is None:
                raise SafeCPLDataError(f"{display}: row {row}: context pair {pid!r} is not a pair_id of this dataset")
            if other == row:
                raise SafeCPLDataError(f"{display}: row {row}: its context set contains the example's own pair {pid!r}")
            if users[other] != users[row]:
                raise SafeCPLDataError(f"{display}: row {row}: context pair {pid!r} belongs to user {users[other]!r}, "
                                       f"not to the example's user {users[row]!r}")
            rows.append(other + offset)
        index_rows.append(rows + [-1] * (k_max - len(rows)))

    for column in (CONTEXT_INDEX, EXAMPLE_INDEX):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    dataset = dataset.add_column(CONTEXT_INDEX, index_rows)
    dataset = dataset.add_column(EXAMPLE_INDEX, list(range(len(dataset))))
    pool = ContextPool(name=name, prompts=list(dataset[schema.PROMPT]), chosen=list(dataset[schema.CHOSEN]),
                       rejected=list(dataset[schema.REJECTED]), user_ids=users, offset=offset)
    return dataset, pool
