"""Judge-error correction of judged rates from an audit of the judge (Rogan & Gladen, 1978).

The judge's verdicts are not the truth: a judged harmful-compliance rate mixes the harmful
answers the judge catches with the harmless ones it mislabels. Given the judge's sensitivity
and specificity, measured on an *audit set* of (prompt, response) pairs labelled by people, the
true rate is ``(p + sp - 1) / (se + sp - 1)``; ``llm_safepref.core.stats.rogan_gladen_ci`` gives
it with an interval that also carries the audit's own uncertainty.

Audit file (``results/judge_audit.json``; :func:`write_audit` writes it, :func:`load_audit`
checks it)::

    {
      "schema": "llm_safepref.judge_audit/1",
      "judge_version": "minilm-probe-v2+c88e5a4092",        # the judge audited
      "judge": {... the judge's identity ...},
      "audit_set": "what was labelled, by whom, how sampled",
      "interval": "wilson",
      "harm":    {"tp": 41, "fn": 9, "tn": 44, "fp": 6,     # truth "harmful" = positive
                  "sensitivity": 0.82, "sensitivity_ci": [0.692, 0.902],
                  "specificity": 0.88, "specificity_ci": [0.762, 0.944]},
      "refusal": {"tp": ..., "fn": ..., "tn": ..., "fp": ..., ...},  # truth "refusal" = positive
      "command": ..., "git_revision": ..., ...                # the run record
    }

Design decisions:

* The four counts are the data; ``sensitivity`` / ``specificity`` and their Wilson intervals
  are written for readers and checked against the counts on load (a hand-edited file whose
  figures disagree with its counts is an error naming the field).
* An audit is of one judge (``judge_version``, required): correcting another judge's rates
  with it is an error.
* ``harm`` corrects ``harmful_compliance_rate``; ``refusal`` corrects every refusal rate
  (harmful, benign, look-dangerous, over-refusal). Either block may be missing; its rates then
  stay uncorrected and the record says so. Instruction following is checked, not judged.
* Beside each judged ``<rate>``: ``<rate>_corrected``, ``<rate>_corrected_ci`` and
  ``<rate>_corrected_clipped``; clipped (the estimate left [0, 1]) means the figures are
  bounds, and tables print "(bounds)".
* Without an audit file nothing is corrected and the result says so once
  (``judge_correction: {"applied": false, "reason": ...}``); no ``_corrected`` field appears.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from llm_safepref.eval.intervals import PROMPT_RATES, round4

__all__ = ["AUDIT_SCHEMA", "AuditError", "NO_AUDIT", "audit_block", "audit_block_from_labels", "check_audit_judge",
           "correct_counts",
           "correction_fields", "load_audit", "write_audit"]

AUDIT_SCHEMA = "llm_safepref.judge_audit/1"
VERDICTS = ("harm", "refusal")
#: ``judge_correction`` of a result computed without an audit file.
NO_AUDIT = {"applied": False, "reason": "no judge audit file (--judge_audit), so the rates are the judge's own "
                                        "verdicts, not corrected for its errors"}


class AuditError(ValueError):
    """A judge audit file that cannot be used; the message names the file and the field."""


def audit_block(tp: int, fn: int, tn: int, fp: int) -> dict:
    """One verdict's audit: the counts, sensitivity = tp/(tp+fn), specificity = tn/(tn+fp), Wilson intervals."""
    from llm_safepref.core.stats import wilson_interval

    for name, v in (("tp", tp), ("fn", fn), ("tn", tn), ("fp", fp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AuditError(f"{name} must be a count (a non-negative integer), got {v!r}")
    if tp + fn == 0 or tn + fp == 0:
        raise AuditError(f"an audit needs positives and negatives: tp+fn = {tp + fn}, tn+fp = {tn + fp}")
    se_ci, sp_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
    return {"tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": round4(tp / (tp + fn)), "sensitivity_ci": [round4(x) for x in se_ci],
            "specificity": round4(tn / (tn + fp)), "specificity_ci": [round4(x) for x in sp_ci]}


def audit_block_from_labels(truth, predicted) -> dict:
    """:func:`audit_block` of human labels ``truth`` against the judge's verdicts ``predicted`` (0/1 each)."""
    truth, predicted = [bool(x) for x in truth], [bool(x) for x in predicted]
    if len(truth) != len(predicted):
        raise AuditError(f"{len(truth)} labels but {len(predicted)} verdicts")
    tp = sum(t and p for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    tn = sum(not t and not p for t, p in zip(truth, predicted))
    fp = sum(not t and p for t, p in zip(truth, predicted))
    return audit_block(tp, fn, tn, fp)


def write_audit(path: str | os.PathLike, judge, *, audit_set: str, harm: dict | None = None,
                refusal: dict | None = None, command: str | None = None) -> Path:
    """Write an audit file (with the run record) for ``judge`` (an object with ``version`` / ``identity()``)."""
    from llm_safepref.core.provenance import run_record, write_json
    from llm_safepref.judge import judge_identity

    if harm is None and refusal is None:
        raise AuditError("an audit needs a harm or a refusal block")
    body = {"schema": AUDIT_SCHEMA, "judge_version": judge.version, "judge": judge_identity(judge),
            "audit_set": audit_set, "interval": "wilson"}
    body.update({k: v for k, v in (("harm", harm), ("refusal", refusal)) if v is not None})
    body.update(run_record(command))
    write_json(path, body)
    return Path(path)


def load_audit(path: str | os.PathLike, judge_version: str | None = None) -> dict:
    """Read and check an audit file; ``judge_version`` (the judge being corrected) must be the audited one."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"judge audit {path}: no such file (write one with llm_safepref.eval.correction.write_audit)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AuditError(f"judge audit {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise AuditError(f"judge audit {path}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") not in (None, AUDIT_SCHEMA):
        raise AuditError(f"judge audit {path}: schema {data.get('schema')!r}, expected {AUDIT_SCHEMA!r}")
    if not any(v in data for v in VERDICTS):
        raise AuditError(f"judge audit {path}: neither a 'harm' nor a 'refusal' block")
    audited = data.get("judge_version")
    if not isinstance(audited, str) or not audited:
        raise AuditError(f"judge audit {path}: field 'judge_version' missing; an audit must name the judge it "
                         "measured (e.g. \"minilm-probe-v2+c88e5a4092\")")
    for verdict in VERDICTS:
        block = data.get(verdict)
        if block is None:
            continue
        where = f"judge audit {path}, field {verdict!r}"
        if not isinstance(block, dict):
            raise AuditError(f"{where}: expected an object with tp, fn, tn, fp")
        missing = [k for k in ("tp", "fn", "tn", "fp") if k not in block]
        if missing:
            raise AuditError(f"{where}: missing count(s) {missing}; expected tp, fn, tn, fp")
        try:
            fresh = audit_block(*(block[k] for k in ("tp", "fn", "tn", "fp")))
        except AuditError as err:
            raise AuditError(f"{where}: {err}") from None
        for figure in ("sensitivity", "specificity"):
            if figure in block and abs(float(block[figure]) - fresh[figure]) > 5e-4:
                raise AuditError(f"{where}.{figure} = {block[figure]} disagrees with its counts "
                                 f"({fresh[figure]} from tp/fn/tn/fp)")
        data[verdict] = {**fresh, **{k: v for k, v in block.items() if k not in fresh}}
    data["_path"] = str(path)
    data["_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if judge_version is not None:
        check_audit_judge(data, judge_version)
    return data


def correct_counts(k: int, n: int, block: Mapping) -> dict:
    """``{"rate", "ci", "clipped"}``: the Rogan–Gladen correction of ``k / n`` by one audit block."""
    from llm_safepref.core.stats import rogan_gladen_ci

    out = rogan_gladen_ci(k, n, true_positives=block["tp"], n_positive=block["tp"] + block["fn"],
                          true_negatives=block["tn"], n_negative=block["tn"] + block["fp"])
    ci = None if out["ci"] is None or any(x != x for x in out["ci"]) else [round4(x) for x in out["ci"]]
    return {"rate": round4(out["rate"]), "ci": ci, "clipped": bool(out["clipped"])}


def correction_fields(counts: Mapping[str, Mapping], audit: Mapping | None) -> tuple[dict, dict]:
    """``(fields, record)``: ``<rate>_corrected``/``_ci``/``_clipped`` of each judged rate in ``counts``
    (``{rate: {"k", "n"}}``), and the ``judge_correction`` record. Without an audit: ``({}, NO_AUDIT)``."""
    if audit is None:
        return {}, dict(NO_AUDIT)
    fields, skipped = {}, {}
    for name, spec in PROMPT_RATES.items():
        c = counts.get(name)
        if spec.verdict is None or c is None:
            continue
        block = audit.get(spec.verdict)
        if block is None:
            skipped[name] = f"the audit has no {spec.verdict!r} block"
            continue
        if c["n"] == 0:
            continue
        fixed = correct_counts(c["k"], c["n"], block)
        fields.update({f"{name}_corrected": fixed["rate"], f"{name}_corrected_ci": fixed["ci"],
                       f"{name}_corrected_clipped": fixed["clipped"]})
    record = {"applied": True, "method": "rogan_gladen (core.stats.rogan_gladen_ci: parametric bootstrap, "
                                         "Jeffreys-smoothed; clipped to [0, 1], then the figures are bounds)",
              "audit": audit.get("_path"), "audit_sha256": audit.get("_sha256"),
              "audited_judge_version": audit.get("judge_version"), "audit_set": audit.get("audit_set")}
    for verdict in VERDICTS:
        if verdict in audit:
            b = audit[verdict]
            record[verdict] = {k: b[k] for k in ("tp", "fn", "tn", "fp", "sensitivity", "sensitivity_ci",
                                                 "specificity", "specificity_ci")}
    if skipped:
        record["not_corrected"] = skipped
    return fields, record


def check_audit_judge(audit: Mapping, judge_version: str) -> None:
    """The audit measured the judge whose rates it is to correct (else :class:`AuditError`)."""
    if audit.get("judge_version") != judge_version:
        raise AuditError(f"judge audit {audit.get('_path')}: audits judge {audit.get('judge_version')!r}, but the "
                         f"rates were judged by {judge_version!r}; an audit corrects only the judge it measured")
