"""Trainer-side checks of a preference dataset with safety labels, run before training.

Design decisions:

* :class:`~llm_safepref.presa_trainer.PresaTrainer` accepts any ``datasets.Dataset``, not
  only one made by ``llm_safepref.data``, so it checks what its loss needs itself: the
  columns, boolean labels, non-empty responses, and that both safe and unsafe responses
  occur. The data package's ``validate_preference_dataset`` checks files and schemas; this
  module checks what reaches the trainer (the recipe runs both).
* Problems that make training meaningless raise ``ValueError`` naming the dataset, row and
  column and what was expected. Problems that only weaken training (no unsafe response,
  only unsafe responses, prompts dropped for length) are ``UserWarning``\\ s.
* Prompt length is checked by the trainer after its own tokenisation (chat template
  included), because only that count decides whether TRL drops an example.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["SAFETY_LABEL_COLUMNS", "REQUIRED_COLUMNS", "check_presa_dataset", "warn_dropped_rows"]

#: Per-response safety labels, True = safe (PRESA's y = +1).
SAFETY_LABEL_COLUMNS = ("chosen_is_safe", "rejected_is_safe")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", *SAFETY_LABEL_COLUMNS)
_MAX_ROWS_NAMED = 10


def _is_bool(value: Any) -> bool:
    # bool and numpy.bool_ (datasets may hand either back); ints are refused on purpose.
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _text_of(value: Any) -> str:
    """The text of a plain string or of a conversational message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return ""


def check_presa_dataset(dataset, *, name: str = "train") -> dict[str, int]:
    """Check a raw (untokenised) PRESA dataset; return label counts.

    Raises ``ValueError`` for a missing column, a label that is not a boolean, or an empty
    prompt / chosen / rejected response. Warns when the dataset has no unsafe response (the
    constraint then only pushes safe responses up) or only unsafe ones (nothing safe to move
    towards). Returns ``{"rows", "safe", "unsafe"}``.
    """
    columns = list(dataset.column_names or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{name} dataset: missing column(s) {missing}; PRESA needs {list(REQUIRED_COLUMNS)} "
            f"(chosen_is_safe / rejected_is_safe: True when that response is safe). Found columns: {columns}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} dataset: it has no rows")

    # Column-wise reads: one Arrow -> Python conversion per column, fast on 100k rows.
    safe = unsafe = 0
    for column in SAFETY_LABEL_COLUMNS:
        for row, value in enumerate(dataset[column]):
            if not _is_bool(value):
                raise ValueError(
                    f"{name} dataset, row {row}, column {column!r}: expected a boolean (True = safe), "
                    f"got {value!r} of type {type(value).__name__}"
                )
            safe += bool(value)
            unsafe += not bool(value)
    for column in ("prompt", "chosen", "rejected"):
        for row, value in enumerate(dataset[column]):
            if not _text_of(value).strip():
                raise ValueError(
                    f"{name} dataset, row {row}, column {column!r}: expected a non-empty "
                    f"{'prompt' if column == 'prompt' else 'response'}, got {value!r}"
                )

    if unsafe == 0:
        warnings.warn(
            f"{name} dataset: no response is labelled unsafe ({safe} safe); the safety constraint can only raise "
            "the probability of safe responses and will not teach the model what to avoid",
            UserWarning,
            stacklevel=2,
        )
    if safe == 0:
        warnings.warn(
            f"{name} dataset: every response is labelled unsafe ({unsafe}); there is no safe behaviour to move "
            "towards, only away from",
            UserWarning,
            stacklevel=2,
        )
    return {"rows": len(dataset), "safe": safe, "unsafe": unsafe}


def warn_dropped_rows(dropped: list[int], total: int, *, name: str, max_length: int) -> None:
    """Warn (or raise when nothing is left) about rows dropped because the prompt fills ``max_length``."""
    if not dropped:
        return
    shown = ", ".join(str(r) for r in dropped[:_MAX_ROWS_NAMED]) + (" ..." if len(dropped) > _MAX_ROWS_NAMED else "")
    message = (
        f"{name} dataset: {len(dropped)} of {total} rows have a tokenised prompt of at least max_length={max_length} "
        f"tokens and are dropped (no completion token would remain): rows {shown}. Raise max_length or shorten "
        "those prompts."
    )
    if len(dropped) == total:
        raise ValueError(message.replace("are dropped", "would be dropped, leaving nothing to train on"))
    warnings.warn(message, UserWarning, stacklevel=2)
