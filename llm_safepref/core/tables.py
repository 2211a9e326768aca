"""Markdown and console tables, and the one way the toolkit formats a figure with its spread."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["format_value", "format_with_ci", "format_mean_std", "markdown_table", "text_table"]


def format_value(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (``—`` for None / nan); anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def format_with_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.170 [0.110, 0.260]``."""
    text = format_value(value, digits)
    if ci is None or value is None:
        return text
    return f"{text} [{format_value(ci[0], digits)}, {format_value(ci[1], digits)}]"


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.170 ± 0.012``."""
    text = format_value(mean, digits)
    return text if std is None else f"{text} ± {format_value(std, digits)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3,
                   align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column: ``l``, ``r`` or ``c`` (default: numbers right)."""
    cells = [[format_value(v, digits) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the header {len(headers)}")
    if align is None:
        align = ["r" if rows and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows)
                 else "l" for i in range(len(headers))]
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3) -> str:
    """A fixed-width console table (first column left-aligned, the rest right-aligned)."""
    cells = [[format_value(v, digits) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), *(line(r) for r in cells)])
