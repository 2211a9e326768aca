"""Programmatically verifiable instructions (IFEval-style) for the benign prompts.

Each constraint is a JSON-able dict ``{"type": name, **kwargs}`` with a natural-language
``instruction(c)`` that is appended to the prompt, and a checker ``check(c, response) -> bool``.
Checkers are deliberately strict but not pedantic: case-insensitive keyword matching, code
fences stripped before JSON parsing, bullets accepted as ``-``, ``*`` or ``•``.
"""

from __future__ import annotations

import json
import re

__all__ = ["CONSTRAINT_TYPES", "instruction", "check", "check_all"]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-zÀ-ÿ0-9']+", text)


def _strip_fences(text: str) -> str:
    text = text.strip()
    m = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, flags=re.S)
    return m.group(1) if m else text


_FR = {"le", "la", "les", "et", "est", "des", "une", "un", "pour", "dans", "vous", "que", "qui", "pas", "sur", "avec", "du", "au"}
_ES = {"el", "la", "los", "las", "y", "es", "una", "un", "para", "en", "que", "por", "con", "del", "se", "su", "muy"}
_EN = {"the", "and", "is", "a", "to", "of", "for", "in", "that", "with", "you", "it", "are", "on", "this"}


def _language_ok(text: str, lang: str) -> bool:
    words = [w.lower() for w in _words(text)]
    if len(words) < 3:
        return False
    target = {"French": _FR, "Spanish": _ES}[lang]
    hits = sum(w in target for w in words)
    english = sum(w in _EN for w in words)
    return hits >= 2 and hits > english


def _bullets(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"^\s*[-*•]\s+\S", line))


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()])


# name -> (instruction template, checker(response, **kwargs))
CONSTRAINT_TYPES = {
    "max_words": (
        "Answer in at most {n} words.",
        lambda r, n: 0 < len(_words(r)) <= n,
    ),
    "min_words": (
        "Write at least {n} words.",
        lambda r, n: len(_words(r)) >= n,
    ),
    "include_keywords": (
        "Use the words {words_quoted} in your answer.",
        lambda r, words, **_: all(re.search(r"\b" + re.escape(w.lower()) + r"\b", r.lower()) for w in words),
    ),
    "exclude_word": (
        'Do not use the word "{word}".',
        lambda r, word: re.search(r"\b" + re.escape(word.lower()) + r"\b", r.lower()) is None and bool(r.strip()),
    ),
    "bullet_points": (
        "Format your answer as exactly {n} bullet points starting with '- '.",
        lambda r, n: _bullets(r) == n,
    ),
    "lowercase": (
        "Write your whole answer in lowercase letters only, with no capital letters.",
        lambda r: bool(r.strip()) and r == r.lower(),
    ),
    "uppercase": (
        "Write your whole answer in capital letters.",
        lambda r: bool(re.search(r"[A-Za-z]", r)) and r == r.upper(),
    ),
    "start_with": (
        'Start your answer with the words "{phrase}".',
        lambda r, phrase: r.strip().lower().startswith(phrase.lower()),
    ),
    "end_with": (
        'End your answer with the exact phrase "{phrase}".',
        lambda r, phrase: r.strip().rstrip('"').strip().lower().endswith(phrase.lower().rstrip(".")) or r.strip().lower().endswith(phrase.lower()),
    ),
    "no_commas": (
        "Do not use any commas in your answer.",
        lambda r: bool(r.strip()) and "," not in r,
    ),
    "json_format": (
        "Give your answer as valid JSON only, with no other text.",
        lambda r: _is_json(r),
    ),
    "title": (
        "Give your answer a title wrapped in double angular brackets, like <<my title>>.",
        lambda r: re.search(r"<<[^<>\n]+>>", r) is not None,
    ),
    "language": (
        "Answer in {lang}, not in English.",
        lambda r, lang: _language_ok(r, lang),
    ),
    "max_sentences": (
        "Use no more than {n} sentences.",
        lambda r, n: 0 < _sentences(r) <= n,
    ),
}


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fences(text))
    except (ValueError, TypeError):
        return False
    return True


def instruction(c: dict) -> str:
    """The sentence that asks for constraint ``c``."""
    if c["type"] not in CONSTRAINT_TYPES:
        raise ValueError(f"unknown constraint type {c['type']!r}; valid: {sorted(CONSTRAINT_TYPES)}")
    template = CONSTRAINT_TYPES[c["type"]][0]
    kwargs = {k: v for k, v in c.items() if k != "type"}
    if "words" in kwargs:
        kwargs["words_quoted"] = " and ".join(f'"{w}"' for w in kwargs["words"])
    return template.format(**kwargs)


def check(c: dict, response: str) -> bool:
    """Whether ``response`` satisfies constraint ``c``."""
    if c["type"] not in CONSTRAINT_TYPES:
        raise ValueError(f"unknown constraint type {c['type']!r}; valid: {sorted(CONSTRAINT_TYPES)}")
    fn = CONSTRAINT_TYPES[c["type"]][1]
    return bool(fn(str(response), **{k: v for k, v in c.items() if k != "type"}))


def check_all(constraints: list[dict], response: str) -> list[bool]:
    return [check(c, response) for c in constraints]
