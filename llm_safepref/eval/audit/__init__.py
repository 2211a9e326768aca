"""The judge audit set: the embedded model's own answers on validation prompts, labelled by the project.

Files (package data, ``data_cards/judge_audit.md``):

* ``judge_audit_v1.jsonl``: one answer a line, ``{id, prompt_id, category, model, decoding, prompt,
  response}``, built by ``scripts/build_audit_set.py`` (its run record and generation settings in
  ``judge_audit_v1.manifest.json``);
* ``judge_audit_v1_labels.jsonl``: ``{id, harmful, refusal, note, labeller}``, written blind to the
  judge under ``docs/judge_audit_guidelines.md``.

``python -m llm_safepref.eval.audit --out results/judge_audit.json`` runs a judge (default the
packaged one) on the set and writes the audit file of ``llm_safepref.eval.correction``, which
``python -m llm_safepref.eval --judge_audit`` uses to correct judged rates.

Design decisions:

* **Where each verdict is measured.** ``harm`` (which corrects the harmful-compliance rates) is
  measured on the answers to prompts where a harmful answer is possible and which those rates
  count: the ``harmful`` and ``contrast_harmful`` categories (:data:`HARM_CATEGORIES`). On benign
  and look-dangerous prompts the judge's request gate makes "harmful" nearly impossible, and
  those easy negatives would inflate its specificity. ``refusal`` (which corrects refusal rates
  over every category) is measured on every answer. ``harm_all_answers`` gives the harm verdict
  on every answer too, for readers.
* **Breakdowns** in extra fields the correction ignores: ``by_model`` (``<model>-<decoding>``:
  base greedy, PRESA greedy, base sampled; harm over its harmful / contrast answers) and
  ``by_category`` (harm over the category's own answers, so the false "harmful" verdicts on
  benign and look-dangerous answers show); a block without positives or negatives keeps its
  counts and gives ``null`` for the undefined figure.
* **Recountable.** ``verdicts`` stores every row's judge verdicts and scores by id, and
  ``audit_files`` the sha256 of the set and the labels, so the counts can be checked against
  the shipped labels without running a model (``tests/test_judge_audit.py`` does).
* Labels are booleans, nothing else (``"false"`` and ``0`` are refused, naming file, line and
  field), and set and labels must match id for id.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llm_safepref.core.jsonl import read_jsonl

__all__ = ["AUDIT_DIR", "AUDIT_SET", "HARM_CATEGORIES", "LABELS", "LABEL_FIELDS", "SET_FIELDS", "audit_counts",
           "joined", "load_audit_labels", "load_audit_set", "score_audit"]

AUDIT_DIR = Path(__file__).resolve().parent
AUDIT_SET = AUDIT_DIR / "judge_audit_v1.jsonl"
LABELS = AUDIT_DIR / "judge_audit_v1_labels.jsonl"
MANIFEST = AUDIT_DIR / "judge_audit_v1.manifest.json"
SET_FIELDS = ("id", "prompt_id", "category", "model", "decoding", "prompt", "response")
LABEL_FIELDS = ("id", "harmful", "refusal", "note", "labeller")
#: Categories whose answers measure the harm verdict (harmful-compliance rates are over them).
HARM_CATEGORIES = ("harmful", "contrast_harmful")


class AuditSetError(ValueError):
    """A malformed audit set or label file; the message names the file, the line and the field."""


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows, seen = [], set()
    for n, row in read_jsonl(path, fields, error=AuditSetError):
        if not isinstance(row["id"], str) or not row["id"]:
            raise AuditSetError(f"{path}, line {n}, field 'id': expected a non-empty string, got {row['id']!r}")
        if row["id"] in seen:
            raise AuditSetError(f"{path}, line {n}, field 'id': {row['id']!r} repeated")
        seen.add(row["id"])
        row["_line"] = n
        rows.append(row)
    return rows


def load_audit_set(path: str | os.PathLike = AUDIT_SET) -> list[dict]:
    """The answers, in file order (``_line`` = 1-based line number); text fields checked to be strings."""
    rows = _read_jsonl(Path(path), SET_FIELDS)
    for r in rows:
        for f in SET_FIELDS:
            if not isinstance(r[f], str):
                raise AuditSetError(f"{path}, line {r['_line']}, field {f!r}: expected a string, got {r[f]!r}")
    return rows


def load_audit_labels(path: str | os.PathLike = LABELS) -> list[dict]:
    """The labels; ``harmful`` / ``refusal`` must be JSON booleans (``"false"`` and ``0`` are refused)."""
    rows = _read_jsonl(Path(path), LABEL_FIELDS)
    for r in rows:
        for f in ("harmful", "refusal"):
            if not isinstance(r[f], bool):
                raise AuditSetError(f"{path}, line {r['_line']}, field {f!r}: expected true or false, got {r[f]!r}")
        for f in ("note", "labeller"):
            if not isinstance(r[f], str):
                raise AuditSetError(f"{path}, line {r['_line']}, field {f!r}: expected a string, got {r[f]!r}")
    return rows


def joined(set_path: str | os.PathLike = AUDIT_SET, labels_path: str | os.PathLike = LABELS) -> list[dict]:
    """Every answer with its labels (``harmful``, ``refusal``, ``note``, ``labeller``); ids must match one to one."""
    rows, labels = load_audit_set(set_path), load_audit_labels(labels_path)
    by_id = {r["id"]: r for r in labels}
    unlabelled = [r["id"] for r in rows if r["id"] not in by_id]
    extra = sorted(set(by_id) - {r["id"] for r in rows})
    if unlabelled or extra:
        raise AuditSetError(f"{labels_path}: labels and {set_path} must match id for id; unlabelled answers "
                            f"{unlabelled[:5]} ({len(unlabelled)}), labels of no answer {extra[:5]} ({len(extra)})")
    return [{**r, **{f: by_id[r["id"]][f] for f in LABEL_FIELDS[1:]}} for r in rows]


def audit_counts(truth: list[bool], predicted: list[bool]) -> dict:
    """``{tp, fn, tn, fp, n, sensitivity, sensitivity_ci, specificity, specificity_ci}``; a figure whose
    denominator is 0 is ``None`` (``correction.audit_block`` would refuse it), so small breakdowns still show."""
    from llm_safepref.core.stats import wilson_interval
    from llm_safepref.eval.intervals import round4

    pairs = list(zip(map(bool, truth), map(bool, predicted), strict=True))
    tp = sum(t and p for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    tn = sum(not t and not p for t, p in pairs)
    fp = sum(not t and p for t, p in pairs)
    out: dict = {"tp": tp, "fn": fn, "tn": tn, "fp": fp, "n": len(pairs)}
    for name, k, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        out[name] = round4(k / n) if n else None
        out[f"{name}_ci"] = [round4(x) for x in wilson_interval(k, n)] if n else None
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score_audit(out: str | os.PathLike, *, judge=None, set_path: str | os.PathLike = AUDIT_SET,
                labels_path: str | os.PathLike = LABELS, command: str | None = None) -> dict:
    """Judge every answer of the set, compare with the labels, write the audit file ``out``; returns it."""
    from llm_safepref.core.provenance import write_json
    from llm_safepref.eval.correction import audit_block_from_labels, write_audit
    from llm_safepref.judge import resolve_judge

    rows = joined(set_path, labels_path)
    judge = resolve_judge(judge)
    verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    for r, v in zip(rows, verdicts):
        r["judge_harmful"], r["judge_refusal"] = bool(v["is_harmful"]), bool(v["is_refusal"])
    harm_rows = [r for r in rows if r["category"] in HARM_CATEGORIES]
    harm = audit_block_from_labels([r["harmful"] for r in harm_rows], [r["judge_harmful"] for r in harm_rows])
    refusal = audit_block_from_labels([r["refusal"] for r in rows], [r["judge_refusal"] for r in rows])
    harm.update(n=len(harm_rows), rows=f"answers to {' and '.join(HARM_CATEGORIES)} prompts")
    refusal.update(n=len(rows), rows="every answer")

    def blocks(subset: list[dict], harm_rows_only: bool = True) -> dict:
        # by_model: harm over the subset's harmful / contrast answers (as the headline block);
        # by_category: over the category's own answers (benign and look-dangerous show false alarms).
        h = [r for r in subset if r["category"] in HARM_CATEGORIES] if harm_rows_only else subset
        return {"n": len(subset),
                "harm": audit_counts([r["harmful"] for r in h], [r["judge_harmful"] for r in h]),
                "refusal": audit_counts([r["refusal"] for r in subset], [r["judge_refusal"] for r in subset]),
                "label_harmful_rate": round(sum(r["harmful"] for r in subset) / len(subset), 4),
                "label_refusal_rate": round(sum(r["refusal"] for r in subset) / len(subset), 4),
                "judge_harmful_rate": round(sum(r["judge_harmful"] for r in subset) / len(subset), 4),
                "judge_refusal_rate": round(sum(r["judge_refusal"] for r in subset) / len(subset), 4)}

    groups: dict[str, dict[str, list]] = {"by_model": {}, "by_category": {}}
    for r in rows:
        groups["by_model"].setdefault(f"{r['model']}-{r['decoding']}", []).append(r)
        groups["by_category"].setdefault(r["category"], []).append(r)
    labellers = sorted({r["labeller"] for r in rows})
    manifest = json.loads(MANIFEST.read_text()) if Path(set_path) == AUDIT_SET and MANIFEST.is_file() else {}
    description = (
        f"{len(rows)} answers of the embedded SmolLM2-135M-Instruct on safety-benchmark validation prompts "
        f"({', '.join(f'{k}: {len(v)}' for k, v in groups['by_model'].items())}; categories "
        f"{', '.join(f'{k}: {len(v)}' for k, v in groups['by_category'].items())}), generated by "
        "scripts/build_audit_set.py (greedy, 64 new tokens, chat template, as the evaluation; sampled rows at "
        "T=0.8), labelled blind to the judge by " + "; ".join(labellers) + " under docs/judge_audit_guidelines.md "
        "(one labeller). harm: answers to harmful and contrast_harmful prompts; refusal: every answer. "
        "Data card: data_cards/judge_audit.md.")
    path = write_audit(out, judge, audit_set=description, harm=harm, refusal=refusal, command=command)
    data = json.loads(Path(path).read_text())
    run_keys = ("command", "git_revision", "versions", "lock_sha256", "machine", "date")
    run = {k: data.pop(k) for k in run_keys if k in data}
    data.update({
        "harm_all_answers": audit_counts([r["harmful"] for r in rows], [r["judge_harmful"] for r in rows]),
        "by_model": {k: blocks(v) for k, v in groups["by_model"].items()},
        "by_category": {k: blocks(v, harm_rows_only=False) for k, v in groups["by_category"].items()},
        "audit_files": {"set": _rel(set_path), "set_sha256": _sha(Path(set_path)),
                        "labels": _rel(labels_path), "labels_sha256": _sha(Path(labels_path)),
                        "n_rows": len(rows), "labellers": labellers,
                        "guidelines": "docs/judge_audit_guidelines.md (v1)",
                        "set_manifest": {k: manifest.get(k) for k in ("benchmark_folder", "models", "generation",
                                                                      "generation_seconds_total", "command",
                                                                      "git_revision", "date")} if manifest else None},
        "verdicts": {r["id"]: {"is_harmful": r["judge_harmful"], "is_refusal": r["judge_refusal"],
                               "harm_score": round(float(v["harm_score"]), 4) if v.get("harm_score") is not None
                               else None,
                               "refusal_score": round(float(v["refusal_score"]), 4)
                               if v.get("refusal_score") is not None else None}
                     for r, v in zip(rows, verdicts)},
        **run,
    })
    write_json(path, data)
    return data


def _rel(path) -> str:
    p = Path(path).resolve()
    root = AUDIT_DIR.parents[2]
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
