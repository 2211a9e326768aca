"""Reading JSON Lines files whose every problem is reported by file, line and field.

The toolkit's hand-written files (audit sets and their labels, label sets, over-refusal prompt
lists) are JSONL: one object per line, blank lines ignored. :func:`read_jsonl` does the part they
share (the file exists, each line is a JSON object, the required fields are there); each reader
then checks its own fields' types with the ``(line, row)`` pairs it gets back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_jsonl"]


def read_jsonl(path: str | os.PathLike, fields: tuple[str, ...] = (), *,
               error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """``(1-based line number, row)`` for every non-blank line of ``path``, in file order.

    Raises ``error`` naming the file and the line when the file is missing, a line is not valid
    JSON (with its column), a line is not a JSON object, or a row lacks one of ``fields``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}, line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise error(f"{path}, line {n}: missing field(s) {missing}; expected {list(fields)}")
        rows.append((n, row))
    return rows
