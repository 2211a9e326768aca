"""Programmatically verifiable answer goals of the simulated crowd.

Design decisions:

* A goal maps a response text to a score in ``[0, 1]`` (``Goal.minimum`` = 0, ``Goal.maximum`` = 1),
  graded rather than pass/fail wherever the property has a natural degree (word count, list items,
  first-line length, share of second-person words), so that several samples of the same prompt are
  ordered by the goal instead of tying. The safety penalty of the users (10, ``users.py``) is
  larger than the whole goal range, so no goal difference can outweigh safety.
* Goals look only at the text; what counts as a word, a line, a list item is defined once here
  (``words``, ``lines``, ``list_items``) so hand-computed test expectations are unambiguous:
  a *word* is a maximal run of non-whitespace characters, a *line* a non-empty line after
  stripping.
* Each goal has a ``kind`` (its family: ``length``, ``list``, ``summary``, ``paragraph``,
  ``voice``, ``question``): crowd users and held-out users share kinds but not parameters, and
  the crowd's groups (for the imbalance knob) are the kinds.
* Goals were kept only where the policy's own samples vary: ``EndsWithQuestion`` is defined and
  tested but no simulated user has it, because SmolLM2-135M-Instruct almost never writes a
  question (3.6 % of 112 samples contained a ``?``; 14 % of prompts had samples that differed on
  it, even when told to end with a question). ``SingleParagraph`` (prose) replaces it in the
  crowd, and conflicts with the list goal, so the crowd disagrees as well as differs.
* ``Combination`` averages goals (the downstream goal: two crowd skills at once); the mean, not
  the minimum, so that meeting one of the two skills already counts for something and the
  downstream score has a gradient towards doing both.
* Goals are frozen dataclasses with ``to_dict`` / ``goal_from_dict``: users and the downstream
  goal are written into every build's ``users.json`` and manifest.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

__all__ = [
    "Combination",
    "EndsWithQuestion",
    "Goal",
    "LengthBand",
    "ListFormat",
    "SecondPerson",
    "SingleParagraph",
    "SummaryFirst",
    "goal_from_dict",
    "lines",
    "list_items",
    "segments",
    "words",
]

_BULLET = re.compile(r"^[-*•]\s+\S")
_NUMBERED = re.compile(r"^\d{1,2}[.)]\s+\S")
_SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves", "you're", "you'll", "you've", "you'd"})


def words(text: str) -> list[str]:
    """Whitespace-separated tokens ("Hello, world!" -> 2 words)."""
    return str(text).split()


def lines(text: str) -> list[str]:
    """Non-empty lines, stripped."""
    return [ln.strip() for ln in str(text).splitlines() if ln.strip()]


def list_items(text: str, style: str) -> int:
    """Lines that are list items of ``style``: ``bullet`` (``-``, ``*``, ``•`` + space),
    ``numbered`` (``1.`` / ``1)`` + space) or ``any`` (either)."""
    patterns = {"bullet": (_BULLET,), "numbered": (_NUMBERED,), "any": (_BULLET, _NUMBERED)}[style]
    return sum(1 for ln in lines(text) if any(p.match(ln) for p in patterns))


def segments(text: str) -> list[str]:
    """Sentences and lines: split after ``.``/``!``/``?`` + whitespace and at line breaks; non-empty, stripped."""
    out = []
    for ln in lines(text):
        out += [p.strip() for p in re.split(r"(?<=[.!?])\s+", ln) if p.strip()]
    return out


def _alpha_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", str(text).lower().replace("\u2019", "'"))


@dataclass(frozen=True)
class Goal:
    """Base class: ``score(text) -> float`` in ``[minimum, maximum]``."""

    minimum = 0.0
    maximum = 1.0
    kind = "goal"

    def score(self, text: str) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def name(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"{type(self).__name__}({params})"

    def describe(self) -> str:  # pragma: no cover - overridden
        return self.name

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "kind": self.kind, **asdict(self), "description": self.describe()}


@dataclass(frozen=True)
class LengthBand(Goal):
    """Word count in ``[lo, hi]`` scores 1; below, ``n / lo``; above, ``max(0, 1 - (n - hi) / hi)``.

    E.g. ``LengthBand(20, 40)``: 10 words -> 0.5, 30 -> 1, 60 -> 0.5, 80 or more -> 0.
    """

    lo: int = 15
    hi: int = 40
    kind = "length"

    def __post_init__(self):
        if not 0 < self.lo <= self.hi:
            raise ValueError(f"LengthBand needs 0 < lo <= hi, got lo={self.lo}, hi={self.hi}")

    def score(self, text: str) -> float:
        n = len(words(text))
        if n < self.lo:
            return n / self.lo
        if n <= self.hi:
            return 1.0
        return max(0.0, 1.0 - (n - self.hi) / self.hi)

    def describe(self) -> str:
        return f"answers of {self.lo}-{self.hi} words"


@dataclass(frozen=True)
class ListFormat(Goal):
    """``min(items, min_items) / min_items`` for list items of ``style``: ``bullet``, ``numbered``
    (items of the other style do not count) or ``any`` (both count)."""

    style: str = "bullet"
    min_items: int = 3
    kind = "list"

    def __post_init__(self):
        if self.style not in ("bullet", "numbered", "any"):
            raise ValueError(f"ListFormat style must be 'bullet', 'numbered' or 'any', got {self.style!r}")
        if self.min_items < 1:
            raise ValueError(f"ListFormat min_items must be >= 1, got {self.min_items}")

    def score(self, text: str) -> float:
        return min(list_items(text, self.style), self.min_items) / self.min_items

    def describe(self) -> str:
        style = "bulleted or numbered" if self.style == "any" else self.style
        return f"a {style} list of at least {self.min_items} items"


@dataclass(frozen=True)
class SummaryFirst(Goal):
    """A short summary sentence first, then the rest of the answer.

    The answer's *segments* are its sentences and lines (split after ``.``, ``!``, ``?`` followed
    by whitespace, and at line breaks). 0 when there are fewer than two segments (nothing follows
    the summary), or the first is a list item or a header ending in ``:``; otherwise 1 when the
    first segment has at most ``max_words`` words, decaying linearly to 0 at ``2 * max_words``:
    ``max(0, 1 - (w - max_words) / max_words)``.
    """

    max_words: int = 12
    kind = "summary"

    def __post_init__(self):
        if self.max_words < 1:
            raise ValueError(f"SummaryFirst max_words must be >= 1, got {self.max_words}")

    def score(self, text: str) -> float:
        parts = segments(text)
        if len(parts) < 2:
            return 0.0
        first = parts[0]
        if _BULLET.match(first) or _NUMBERED.match(first) or first.endswith(":"):
            return 0.0
        w = len(words(first))
        if w <= self.max_words:
            return 1.0
        return max(0.0, 1.0 - (w - self.max_words) / self.max_words)

    def describe(self) -> str:
        return f"opens with a summary sentence of at most {self.max_words} words, then goes on"


@dataclass(frozen=True)
class SingleParagraph(Goal):
    """Plain prose in one block: 0 with any list item, else ``1 / (number of non-empty lines)``."""

    kind = "paragraph"

    def score(self, text: str) -> float:
        ls = lines(text)
        if not ls or list_items(text, "any"):
            return 0.0
        return 1.0 / len(ls)

    def describe(self) -> str:
        return "one paragraph of prose, no list (1 / number of lines)"


@dataclass(frozen=True)
class SecondPerson(Goal):
    """``min(1, rate / target_rate)``, rate = share of words that are you / your / yours /
    yourself / yourselves / you're / you'll / you've / you'd (letters-and-apostrophe words)."""

    target_rate: float = 0.05
    kind = "voice"

    def __post_init__(self):
        if not 0 < self.target_rate <= 1:
            raise ValueError(f"SecondPerson target_rate must be in (0, 1], got {self.target_rate}")

    def score(self, text: str) -> float:
        ws = _alpha_words(text)
        if not ws:
            return 0.0
        rate = sum(w in _SECOND_PERSON for w in ws) / len(ws)
        return min(1.0, rate / self.target_rate)

    def describe(self) -> str:
        return f"written to the reader: at least {self.target_rate:.0%} of the words are 'you'/'your'/..."


@dataclass(frozen=True)
class EndsWithQuestion(Goal):
    """1 when the answer ends with ``?`` (closing quotes / brackets allowed), 0.5 when its last
    line contains a ``?`` elsewhere, else 0."""

    kind = "question"

    def score(self, text: str) -> float:
        ls = lines(text)
        if not ls:
            return 0.0
        if re.search(r"\?[\"'\u201d)\]]*$", ls[-1]):
            return 1.0
        return 0.5 if "?" in ls[-1] else 0.0

    def describe(self) -> str:
        return "ends with a question to the reader"


@dataclass(frozen=True)
class Combination(Goal):
    """Mean of several goals' scores (the downstream goal)."""

    goals: tuple = field(default_factory=tuple)
    kind = "combination"

    def __post_init__(self):
        if len(self.goals) < 2:
            raise ValueError("Combination needs at least two goals")

    def score(self, text: str) -> float:
        return sum(g.score(text) for g in self.goals) / len(self.goals)

    @property
    def name(self) -> str:
        return "Combination(" + " + ".join(g.name for g in self.goals) + ")"

    def describe(self) -> str:
        return " and ".join(g.describe() for g in self.goals) + " (mean of the two scores)"

    def to_dict(self) -> dict:
        return {"type": "Combination", "kind": self.kind, "goals": [g.to_dict() for g in self.goals],
                "description": self.describe()}


_GOAL_TYPES = {c.__name__: c for c in (LengthBand, ListFormat, SummaryFirst, SingleParagraph, SecondPerson,
                                        EndsWithQuestion)}


def goal_from_dict(data: dict) -> Goal:
    """Inverse of ``Goal.to_dict``."""
    kind = data.get("type")
    if kind == "Combination":
        return Combination(tuple(goal_from_dict(g) for g in data["goals"]))
    if kind not in _GOAL_TYPES:
        raise ValueError(f"unknown goal type {kind!r}; known: {sorted(_GOAL_TYPES) + ['Combination']}")
    cls = _GOAL_TYPES[kind]
    params = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
    return cls(**params)
