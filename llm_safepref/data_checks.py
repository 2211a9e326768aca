"""The one validator of preference data with safety labels, used by the data loaders and the trainers.

Design decisions:

* One definition of a safety label (:func:`is_label`): ``True`` / ``False``, as a Python or
  NumPy bool. Integers and strings are refused everywhere: an integer column is as likely a
  response id or a severity score as a label, and a string label that reached the trainer
  would be read by ``bool("false")`` as *safe*. Files whose format has no booleans (CSV) are
  decoded to booleans when ``llm_safepref.data`` reads them, before validation.
* One row check (:func:`check_rows`) behind both entry points: the trainers'
  :func:`check_presa_dataset` (any ``datasets.Dataset`` handed to a trainer) and the loaders'
  ``llm_safepref.data.validate_preference_dataset`` (files, folders, Hub data). The same row
  gets the same verdict and the same message from both.
* A row is valid when its prompt, chosen and rejected texts are non-empty after stripping
  whitespace (the contents of a conversational message list are joined; an empty assistant
  message is an empty response) and both labels are booleans; with a tokenizer, the prompt
  must also fit in ``max_length`` tokens. Problems raise :class:`DataValidationError`
  (a ``ValueError``) naming the dataset, the row (0-based, as ``datasets`` indexes rows), the
  column (and the user's own column when it was renamed or converted) and what was expected. Under ``drop_invalid`` the invalid rows are dropped instead, with ONE
  ``UserWarning`` that names them.
* One place warns about the label balance (:func:`warn_label_balance`): no unsafe response,
  or no safe one, is legal data that makes the safety term one-sided, so it is a warning. It is
  given once per process for a set of rows: when a loader already warned about these rows
  (or rows they are a subset of, e.g. after ``--train_limit``), the trainer's check of them
  stays silent, so a recipe run shows it once.
* Prompt length as the trainer counts it (chat template included) is checked by the trainer
  after TRL's tokenisation (:func:`warn_dropped_rows`), because only that count decides whether
  TRL drops an example.
* Column names come from :mod:`llm_safepref.core.schema`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_safepref.core.schema import (
    CHOSEN,
    CHOSEN_IS_SAFE,
    PREFERENCE_COLUMNS,
    PROMPT,
    REJECTED,
    REJECTED_IS_SAFE,
    SAFETY_LABEL_COLUMNS,
)

__all__ = [
    "SAFETY_LABEL_COLUMNS",
    "REQUIRED_COLUMNS",
    "DataValidationError",
    "RowCheck",
    "check_columns",
    "check_presa_dataset",
    "check_rows",
    "is_label",
    "text_of",
    "warn_dropped_invalid",
    "warn_dropped_rows",
    "warn_label_balance",
]

#: prompt, chosen, rejected, chosen_is_safe, rejected_is_safe.
REQUIRED_COLUMNS = (*PREFERENCE_COLUMNS, *SAFETY_LABEL_COLUMNS)
_MAX_ROWS_NAMED = 10


class DataValidationError(ValueError):
    """A dataset row or column is not what the trainers expect (message names dataset, row, column)."""


def is_label(value: Any) -> bool:
    """True for a safety label: ``True`` / ``False`` (Python ``bool`` or ``numpy.bool_``)."""
    return isinstance(value, (bool, np.bool_))


def text_of(value: Any) -> str:
    """The text of a string, or the newline-joined contents of a conversational message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def check_columns(column_names: Iterable[str], *, name: str, hint: str = "") -> None:
    """Raise :class:`DataValidationError` naming every missing column of :data:`REQUIRED_COLUMNS`."""
    columns = list(column_names or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataValidationError(
            f"{name}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
            f"({CHOSEN_IS_SAFE} / {REJECTED_IS_SAFE}: True when that response is safe){hint}; found columns {columns}"
        )


@dataclass
class RowCheck:
    """The verdict of :func:`check_rows`: kept rows, the first problem of each dropped row, label counts."""

    rows: int
    keep: list[int]
    errors: dict[int, str] = field(default_factory=dict)
    safe: int = 0
    unsafe: int = 0
    #: One key per kept row (texts and labels), for :func:`warn_label_balance`.
    row_keys: frozenset = frozenset()

    @property
    def n_dropped(self) -> int:
        return len(self.errors)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_rows(
    columns: Mapping[str, Sequence],
    *,
    name: str,
    drop_invalid: bool = False,
    max_length: int | None = None,
    tokenizer=None,
    origin: Callable[[int, str], str | None] | None = None,
    invalid: Mapping[int, str] | None = None,
) -> RowCheck:
    """Check every row of ``columns`` (the :data:`REQUIRED_COLUMNS` as equal-length sequences).

    ``origin(row, column)`` may name the user's column a checked column came from (a renamed or
    converted column); ``invalid`` maps rows already found invalid (e.g. while converting a
    schema) to their message. Without ``drop_invalid`` the first invalid row (in row order)
    raises :class:`DataValidationError`; with it, every invalid row is recorded in ``errors``
    and left out of ``keep``. ``max_length`` (needs ``tokenizer``) bounds the prompt's token
    count (the plain text, without special tokens).
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count prompt tokens")
    invalid = dict(invalid or {})
    prompts, chosen, rejected = columns[PROMPT], columns[CHOSEN], columns[REJECTED]
    labels_c, labels_r = columns[CHOSEN_IS_SAFE], columns[REJECTED_IS_SAFE]
    n = len(prompts)
    if not all(len(columns[c]) == n for c in REQUIRED_COLUMNS):
        raise ValueError(f"{name}: columns of unequal length {({c: len(columns[c]) for c in REQUIRED_COLUMNS})}")

    def where(row: int, column: str) -> str:
        mine = origin(row, column) if origin is not None else None
        return f"{name}: row {row}, column {column!r}" + (f" (from {mine!r})" if mine and mine != column else "")

    result = RowCheck(rows=n, keep=[])
    keys = []
    for row in range(n):
        problem = invalid.get(row)
        texts = (text_of(prompts[row]), text_of(chosen[row]), text_of(rejected[row]))
        if problem is None:
            for column, value, text in zip(PREFERENCE_COLUMNS, (prompts[row], chosen[row], rejected[row]), texts):
                if not text.strip():
                    what = "prompt" if column == PROMPT else "response"
                    problem = f"{where(row, column)}: expected a non-empty text ({what}), got {_describe(value)}"
                    break
        if problem is None:
            for column, value in ((CHOSEN_IS_SAFE, labels_c[row]), (REJECTED_IS_SAFE, labels_r[row])):
                if not is_label(value):
                    problem = (f"{where(row, column)}: expected a boolean (true / false; True = safe), "
                               f"got {_describe(value)} of type {type(value).__name__}")
                    break
        if problem is None and max_length is not None:
            n_tok = len(tokenizer(texts[0], add_special_tokens=False).input_ids)
            if n_tok > max_length:
                problem = f"{where(row, PROMPT)}: expected at most {max_length} tokens, got {n_tok}"
        if problem is not None:
            if not drop_invalid:
                raise DataValidationError(problem)
            result.errors[row] = problem
            continue
        result.keep.append(row)
        c, r = bool(labels_c[row]), bool(labels_r[row])
        result.safe += c + r
        result.unsafe += (not c) + (not r)
        keys.append(hash((*texts, c, r)))
    result.row_keys = frozenset(keys)
    return result


def _rows_named(rows: Sequence[int]) -> str:
    return ", ".join(str(r) for r in rows[:_MAX_ROWS_NAMED]) + (" ..." if len(rows) > _MAX_ROWS_NAMED else "")


def warn_dropped_invalid(check: RowCheck, *, name: str) -> None:
    """ONE ``UserWarning`` naming the rows ``drop_invalid`` dropped and the problem of each (first 10)."""
    if not check.errors:
        return
    rows = sorted(check.errors)
    details = "; ".join(check.errors[r].removeprefix(f"{name}: ") for r in rows[:_MAX_ROWS_NAMED])
    more = f"; and {len(rows) - _MAX_ROWS_NAMED} more" if len(rows) > _MAX_ROWS_NAMED else ""
    warnings.warn(
        f"{name}: dropped {len(rows)} of {check.rows} rows as invalid (drop_invalid): rows {_rows_named(rows)}. "
        f"{details}{more}",
        UserWarning,
        stacklevel=3,
    )


# Label-balance warnings already given in this process: kind -> row-key sets (most recent last).
_WARNED: dict[str, list[frozenset]] = {"no_unsafe": [], "no_safe": []}
_WARNED_KEEP = 8


def warn_label_balance(check: RowCheck, *, name: str) -> None:
    """Warn when no kept response is unsafe, or none is safe; once per process for a set of rows."""
    if check.unsafe and check.safe:
        return
    kind = "no_unsafe" if not check.unsafe else "no_safe"
    seen = _WARNED[kind]
    if check.row_keys and any(check.row_keys <= earlier for earlier in seen):
        return  # already said about these rows (e.g. by the loader, before the trainer's check)
    seen.append(check.row_keys)
    del seen[:-_WARNED_KEEP]
    if kind == "no_unsafe":
        message = (f"{name}: no response is labelled unsafe ({check.safe} safe); the safety constraint can only raise "
                   "the probability of safe responses and will not teach the model what to avoid")
    else:
        message = (f"{name}: every response is labelled unsafe ({check.unsafe}); there is no safe behaviour to move "
                   "towards, only away from")
    warnings.warn(message, UserWarning, stacklevel=3)


def check_presa_dataset(dataset, *, name: str = "train") -> dict[str, int]:
    """Check a raw (untokenised) dataset before a trainer tokenises it; return label counts.

    Raises :class:`DataValidationError` (a ``ValueError``) for a missing column, an empty
    dataset, a label that is not a boolean, or an empty prompt / chosen / rejected text; warns
    (:func:`warn_label_balance`) when no response is unsafe or none is safe. Returns
    ``{"rows", "safe", "unsafe"}``.
    """
    display = f"{name} dataset"
    check_columns(dataset.column_names, name=display)
    if len(dataset) == 0:
        raise DataValidationError(f"{display}: it has no rows")
    # Column-wise reads: one Arrow -> Python conversion per column.
    check = check_rows({c: list(dataset[c]) for c in REQUIRED_COLUMNS}, name=display)
    warn_label_balance(check, name=display)
    return {"rows": check.rows, "safe": check.safe, "unsafe": check.unsafe}


def warn_dropped_rows(dropped: list[int], total: int, *, name: str, max_length: int) -> None:
    """Warn (or raise when nothing is left) about rows dropped because the prompt fills ``max_length``."""
    if not dropped:
        return
    message = (
        f"{name} dataset: {len(dropped)} of {total} rows have a tokenised prompt of at least max_length={max_length} "
        f"tokens and are dropped (no completion token would remain): rows {_rows_named(dropped)}. Raise max_length "
        "or shorten those prompts."
    )
    if len(dropped) == total:
        raise ValueError(message.replace("are dropped", "would be dropped, leaving nothing to train on"))
    warnings.warn(message, UserWarning, stacklevel=2)
