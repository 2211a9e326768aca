"""Load crowd preference data: the built crowd benchmark, or any preference file with a user column.

``load_crowd_dataset(name_or_path="embedded", split="train", *, users="crowd", imbalanced=False,
user_column="user_id", conversational=False, context_size=None, context_seed=0)``

Design decisions:

* ``"embedded"`` is the build folder ``crowd_dir(seed)`` (``$LLM_SAFEPREF_CROWD_DIR`` points it
  elsewhere, ``$LLM_SAFEPREF_CROWD_SEED`` picks the seed); a missing build raises a
  ``FileNotFoundError`` that names the build command (a build takes tens of minutes, so it is
  never started implicitly). A build folder path works the same way.
* Anything else is read like the safety benchmark's files (a ``.jsonl`` / ``.json`` / ``.csv`` /
  ``.parquet`` file, a ``save_to_disk`` folder, a Hub id) and validated by
  ``llm_safepref.data.validate_preference_dataset`` (prompt / chosen / rejected / safety labels,
  errors name the row and column), plus a user id column: ``user_id`` or the column named by
  ``user_column``, renamed to ``user_id`` (``llm_safepref.core.schema.USER_ID``). Real crowd data
  trains exactly like the simulated crowd.
* Rows without a ``pair_id`` get ``row<index>``; context sets (``context_size=(2, 8)``) are drawn
  per example by ``llm_safepref.crowd.context.add_context_sets`` and stored as
  ``context_pair_ids``.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm_safepref.core import schema
from llm_safepref.crowd.build import COMPLETE_MARKER, crowd_dir, file_name, is_crowd_built

__all__ = ["CrowdDataError", "crowd_folder", "load_crowd_dataset"]


def _data_error():
    from llm_safepref.data import DataValidationError

    return DataValidationError


class CrowdDataError(ValueError):
    """Raised for crowd-specific problems of a dataset (missing user column, ...)."""


#: The seed-0 build shipped inside the package (see data_cards/crowd_preferences.md).
PACKAGED_DIR = Path(__file__).resolve().parent / "built"


def packaged_crowd_dir(seed: int = 0) -> Path:
    """``llm_safepref/crowd/built/<version>-seed<seed>`` (shipped for seed 0)."""
    return PACKAGED_DIR / crowd_dir(seed).name


def crowd_folder() -> Path:
    """The folder ``"embedded"`` names: ``$LLM_SAFEPREF_CROWD_DIR``, else a complete build in the
    cache, else the build shipped with the package (built or not)."""
    if os.environ.get("LLM_SAFEPREF_CROWD_DIR"):
        return Path(os.environ["LLM_SAFEPREF_CROWD_DIR"])
    seed = int(os.environ.get("LLM_SAFEPREF_CROWD_SEED", "0"))
    cached = crowd_dir(seed)
    if not is_crowd_built(cached) and is_crowd_built(packaged_crowd_dir(seed)):
        return packaged_crowd_dir(seed)
    return cached


def _text(value) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def _check_unlabelled(ds, display: str, drop_invalid: bool):
    """Rows without ``chosen_is_safe`` / ``rejected_is_safe``: the prompt and responses checked as for labelled
    data (non-empty texts; errors name the file, row and column); no label columns are added."""
    from llm_safepref.data_checks import DataValidationError, check_rows, warn_dropped_invalid

    missing = [c for c in schema.PREFERENCE_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{display}: missing column(s) {missing}; a crowd preference file needs "
                                  f"{list(schema.PREFERENCE_COLUMNS)} and a user id column; found {ds.column_names}")
    if len(ds) == 0:
        raise DataValidationError(f"{display}: it has no rows")
    columns = {c: list(ds[c]) for c in schema.PREFERENCE_COLUMNS}
    columns.update({c: [True] * len(ds) for c in schema.SAFETY_LABEL_COLUMNS})  # not checked: absent
    check = check_rows(columns, name=display, drop_invalid=drop_invalid)
    warn_dropped_invalid(check, name=display)
    return ds.select(check.keep) if len(check.keep) != len(ds) else ds


def load_crowd_dataset(name_or_path="embedded", split: str = "train", *, users: str = "crowd",
                       imbalanced: bool = False, user_column: str = schema.USER_ID, conversational: bool = False,
                       context_size=None, context_seed: int = 0, drop_invalid: bool = False):
    """Crowd preference pairs as a ``datasets.Dataset`` with ``prompt, chosen, rejected,
    chosen_is_safe, rejected_is_safe, user_id, pair_id`` (+ the build's other columns).

    ``users`` / ``imbalanced`` choose the file of a build (``crowd`` on train / validation / test,
    ``heldout`` and ``downstream`` on validation / test, ``imbalanced=True``: the crowd's
    imbalanced train file); they are ignored for other files. ``context_size``: ``None`` (no
    context), an int, or ``(min, max)``; ``context_seed`` seeds the draw.
    """
    import datasets

    from llm_safepref.crowd.context import add_context_sets
    from llm_safepref.data import validate_preference_dataset
    from llm_safepref.data.adapters import read_dataset

    name = str(name_or_path)
    folder = None
    if name == "embedded":
        folder = crowd_folder()
        if not is_crowd_built(folder):
            raise FileNotFoundError(
                f"the crowd preference benchmark is not built at {folder}; build it with "
                f"`python -m llm_safepref.crowd build` (needs the safety benchmark: `python -m llm_safepref.data build`), "
                f"or point LLM_SAFEPREF_CROWD_DIR at a built folder")
    elif Path(name).is_dir() and (Path(name) / COMPLETE_MARKER).exists() and (Path(name) / "users.json").exists():
        folder = Path(name)
    if folder is not None:
        path = folder / file_name(users, split, imbalanced)
        display = str(path)
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        display = name
        ds = read_dataset(name, split)

    if user_column not in ds.column_names:
        raise CrowdDataError(
            f"{display}: no user id column {user_column!r} (argument user_column; recipe flag --user_column); crowd data needs one user id per "
            f"row; found columns {ds.column_names}")
    if user_column != schema.USER_ID:
        if schema.USER_ID in ds.column_names:
            ds = ds.remove_columns(schema.USER_ID)
        ds = ds.rename_column(user_column, schema.USER_ID)
    if all(c in ds.column_names for c in schema.SAFETY_LABEL_COLUMNS):
        ds, _ = validate_preference_dataset(ds, source_name=display, drop_invalid=drop_invalid)
    else:  # a crowd without safety labels (Safe-CPL's own setting): the texts are checked the same way
        ds = _check_unlabelled(ds, display, drop_invalid)
    bad = [i for i, u in enumerate(ds[schema.USER_ID]) if u is None or not str(u).strip()]
    if bad:
        raise _data_error()(f"{display}: row {bad[0]}, column {user_column!r}: expected a non-empty user id, "
                            f"got {ds[bad[0]][schema.USER_ID]!r} ({len(bad)} such rows)")
    ds = ds.map(lambda r: {schema.USER_ID: str(r[schema.USER_ID])})
    if "pair_id" not in ds.column_names:
        ds = ds.add_column("pair_id", [f"row{i:06d}" for i in range(len(ds))])

    is_conv = len(ds) > 0 and isinstance(ds[0][schema.PROMPT], list)
    if conversational and not is_conv:
        ds = ds.map(lambda r: {schema.PROMPT: [{"role": "user", "content": r[schema.PROMPT]}],
                               schema.CHOSEN: [{"role": "assistant", "content": r[schema.CHOSEN]}],
                               schema.REJECTED: [{"role": "assistant", "content": r[schema.REJECTED]}]})
    elif not conversational and is_conv:
        ds = ds.map(lambda r: {k: _text(r[k]) for k in schema.PREFERENCE_COLUMNS})
    if context_size is not None:
        ds = add_context_sets(ds, context_size=context_size, seed=context_seed)
    return ds
