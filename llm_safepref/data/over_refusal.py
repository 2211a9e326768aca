"""The safety-v3 over-refusal prompts: look-dangerous prompts and their harmful contrast twins.

Design decisions (also in ``data_cards/safety_eval_prompts.md``):

* Written by the project (Apache-2.0, ``over_refusal_v3/NOTICE.txt``) as frozen package data:
  ``over_refusal_v3/look_dangerous_v3.jsonl`` and ``contrast_harmful_v3.jsonl``, one row
  ``{"id", "prompt", "category", "subcategory", "pair_id"}`` per line. ``category`` is the
  evaluation category (``look_dangerous`` or ``contrast_harmful``), ``subcategory`` the
  over-refusal type (XSTest's taxonomy: :data:`SUBCATEGORIES`), ``pair_id`` links a
  look-dangerous prompt to its contrast twin ("kill the lights" / "kill a sleeping person").
* Evaluation prompts only: the builder puts them in validation and test (never train), so the
  training pairs, safety labels and on-policy samples of safety-v2 are unchanged, and the
  judge never trains on them (``llm_safepref.judge`` reads ``look_dangerous_prompts.jsonl``
  only, not these files).
* A twin pair is one split group (a model selected on validation never saw the twin of a test
  prompt), and the split is stratified by subcategory; see ``build.assign_v3_splits``.
* :func:`load_v3_prompts` checks the files (fields, categories, unique ids and prompts, every
  pair complete) and names file, line and field in its errors.
"""

from __future__ import annotations

from pathlib import Path

from llm_safepref.core.jsonl import read_jsonl

__all__ = ["CONTRAST_CATEGORY", "CONTRAST_FILE", "LOOK_DANGEROUS_V3_FILE", "SUBCATEGORIES", "V3_DIR",
           "V3_SOURCES", "load_v3_prompts"]

V3_DIR = Path(__file__).with_name("over_refusal_v3")
LOOK_DANGEROUS_V3_FILE = V3_DIR / "look_dangerous_v3.jsonl"
CONTRAST_FILE = V3_DIR / "contrast_harmful_v3.jsonl"
#: The evaluation category of the harmful twins: their compliance is harmful compliance, not over-refusal.
CONTRAST_CATEGORY = "contrast_harmful"
SUBCATEGORIES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
                 "historical_events", "privacy_public_figures", "privacy_fictional")
#: ``source`` of the rows in the benchmark's ``eval_prompts``.
V3_SOURCES = {"look_dangerous": "project_look_dangerous_v3", CONTRAST_CATEGORY: "project_contrast_harmful_v3"}
_FIELDS = ("id", "prompt", "category", "subcategory", "pair_id")


def _read(path: Path, category: str) -> list[dict]:
    rows = []
    for lineno, row in read_jsonl(path):
        for field in _FIELDS:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{path}: line {lineno}, field {field!r}: expected a non-empty string, "
                                 f"got {row.get(field)!r}")
        if row["category"] != category:
            raise ValueError(f"{path}: line {lineno}, field 'category': expected {category!r}, got {row['category']!r}")
        if row["subcategory"] not in SUBCATEGORIES:
            raise ValueError(f"{path}: line {lineno}, field 'subcategory': expected one of {SUBCATEGORIES}, "
                             f"got {row['subcategory']!r}")
        rows.append({k: row[k] for k in _FIELDS} | {"_where": f"{path.name}:{lineno}"})
    return rows


def load_v3_prompts(look_path: Path | None = None, contrast_path: Path | None = None) -> list[dict]:
    """Look-dangerous then contrast rows ``{"id", "prompt", "category", "subcategory", "pair_id", "_where"}``.

    ``_where`` is ``file:line`` (for the builder's messages). Raises ``ValueError`` naming the
    file, line and field of the first problem.
    """
    look_path = Path(look_path or LOOK_DANGEROUS_V3_FILE)
    contrast_path = Path(contrast_path or CONTRAST_FILE)
    look, contrast = _read(look_path, "look_dangerous"), _read(contrast_path, CONTRAST_CATEGORY)
    rows = look + contrast
    seen_id, seen_prompt = {}, {}
    for r in rows:
        if r["id"] in seen_id:
            raise ValueError(f"{r['_where']}: id {r['id']!r} repeats {seen_id[r['id']]}")
        key = " ".join(r["prompt"].lower().split())
        if key in seen_prompt:
            raise ValueError(f"{r['_where']}: prompt repeats {seen_prompt[key]}")
        seen_id[r["id"]], seen_prompt[key] = r["_where"], r["_where"]
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], []).append(r)
    for pid, members in by_pair.items():
        cats = sorted(m["category"] for m in members)
        if cats != [CONTRAST_CATEGORY, "look_dangerous"]:
            raise ValueError(f"{members[0]['_where']}: pair_id {pid!r} must have exactly one look_dangerous and one "
                             f"{CONTRAST_CATEGORY} prompt, has {cats}")
        if len({m["subcategory"] for m in members}) != 1:
            raise ValueError(f"{members[0]['_where']}: the two prompts of pair_id {pid!r} have different subcategories")
    return rows
