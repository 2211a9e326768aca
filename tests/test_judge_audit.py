"""The judge audit set (package data), its labels and ``results/judge_audit.json``.

No model runs here: the shipped files are checked against each other, and the audit file's counts
are recounted by hand from the labels and the per-id judge verdicts it stores.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llm_safepref.eval.audit import (AUDIT_SET, HARM_CATEGORIES, LABELS, AuditSetError, audit_counts, joined,
                                     load_audit_labels, load_audit_set)
from llm_safepref.eval.correction import load_audit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "judge_audit.json"


def test_set_and_labels_load_and_match_one_to_one():
    rows, labels = load_audit_set(), load_audit_labels()
    assert len(rows) >= 200
    assert [r["id"] for r in rows] == [r["id"] for r in labels]  # same ids, same order
    assert len({r["id"] for r in rows}) == len(rows)
    for r in labels:
        assert type(r["harmful"]) is bool and type(r["refusal"]) is bool
        assert r["labeller"]
    assert len(joined()) == len(rows)


def test_categories_models_and_blindness():
    rows = load_audit_set()
    cats = Counter(r["category"] for r in rows)
    for c in ("harmful", "benign", "look_dangerous"):
        assert cats[c] >= 30, cats
    models = Counter(f"{r['model']}-{r['decoding']}" for r in rows)
    assert models["base-greedy"] >= 100 and models["presa-greedy"] >= 100, models
    assert any(k.startswith("base-sampled") for k in models), models
    # Base and PRESA answered the same prompts.
    by = {m: {r["prompt_id"] for r in rows if f"{r['model']}-{r['decoding']}" == m} for m in models}
    assert by["base-greedy"] == by["presa-greedy"]
    # Blind: the set file carries no verdict of any kind.
    assert all(set(r) - {"_line"} == {"id", "prompt_id", "category", "model", "decoding", "prompt", "response"}
               for r in rows)
    # Labelled by the project, with both labels used both ways.
    labels = load_audit_labels()
    assert 0 < sum(r["harmful"] for r in labels) < len(labels)
    assert 0 < sum(r["refusal"] for r in labels) < len(labels)


def test_no_test_split_prompt_and_all_from_validation():
    try:
        from llm_safepref.data import load_eval_prompts

        test = list(load_eval_prompts("embedded", "test"))
        validation = {r["id"]: r["prompt"] for r in load_eval_prompts("embedded", "validation")}
    except FileNotFoundError as err:  # no benchmark build available
        pytest.skip(f"benchmark not available: {err}")
    test_ids = {r["id"] for r in test}
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    test_texts = {norm(r["prompt"]) for r in test}
    for r in load_audit_set():
        assert r["prompt_id"] not in test_ids, r["id"]
        assert norm(r["prompt"]) not in test_texts, r["id"]
        assert validation.get(r["prompt_id"]) == r["prompt"], r["id"]


def test_labels_refuse_non_booleans(tmp_path):
    good = {"id": "a", "harmful": False, "refusal": True, "note": "", "labeller": "x"}
    bad = dict(good, id="b", harmful="false")
    f = tmp_path / "labels.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(AuditSetError, match=r"line 2, field 'harmful': expected true or false, got 'false'"):
        load_audit_labels(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, harmful=0, id="c")) + "\n")
    with pytest.raises(AuditSetError, match="line 2, field 'harmful'"):
        load_audit_labels(f)


def test_ids_must_match(tmp_path):
    row = {"id": "a", "prompt_id": "p", "category": "harmful", "model": "base", "decoding": "greedy",
           "prompt": "q", "response": "r"}
    s, lab = tmp_path / "set.jsonl", tmp_path / "labels.jsonl"
    s.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, id="b")) + "\n")
    lab.write_text(json.dumps({"id": "a", "harmful": True, "refusal": False, "note": "", "labeller": "x"}) + "\n")
    with pytest.raises(AuditSetError, match=r"unlabelled answers \['b'\]"):
        joined(s, lab)


def test_audit_counts_by_hand():
    # truth   1 1 1 0 0 0 0
    # judge   1 0 1 0 1 0 0  -> tp 2, fn 1, tn 3, fp 1
    out = audit_counts([1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0])
    assert (out["tp"], out["fn"], out["tn"], out["fp"], out["n"]) == (2, 1, 3, 1, 7)
    assert out["sensitivity"] == 0.6667 and out["specificity"] == 0.75
    assert out["sensitivity_ci"][0] < 0.6667 < out["sensitivity_ci"][1]
    none = audit_counts([0, 0], [0, 1])  # no positives: sensitivity undefined
    assert none["sensitivity"] is None and none["sensitivity_ci"] is None and none["specificity"] == 0.5


@pytest.fixture(scope="module")
def audit():
    if not RESULTS.is_file():
        pytest.fail(f"{RESULTS} missing: run python -m llm_safepref.eval.audit --out results/judge_audit.json")
    return json.loads(RESULTS.read_text())


def test_results_file_is_a_valid_audit_with_run_record(audit):
    loaded = load_audit(RESULTS, judge_version=audit["judge_version"])
    assert loaded["schema"] == "llm_safepref.judge_audit/1"
    for k in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert audit.get(k), k
    assert "llm_safepref.eval.audit" in audit["command"]


def test_results_counts_recount_from_labels_and_stored_verdicts(audit):
    rows = joined()
    assert set(audit["verdicts"]) == {r["id"] for r in rows}
    assert audit["audit_files"]["n_rows"] == len(rows)
    v = audit["verdicts"]

    def count(subset, label, verdict):
        c = Counter((bool(r[label]), bool(v[r["id"]][verdict])) for r in subset)
        return {"tp": c[(True, True)], "fn": c[(True, False)], "tn": c[(False, False)], "fp": c[(False, True)]}

    harm_rows = [r for r in rows if r["category"] in HARM_CATEGORIES]
    expected = {"harm": count(harm_rows, "harmful", "is_harmful"), "refusal": count(rows, "refusal", "is_refusal")}
    for verdict, want in expected.items():
        got = {k: audit[verdict][k] for k in ("tp", "fn", "tn", "fp")}
        assert got == want, verdict
        assert audit[verdict]["sensitivity"] == round(want["tp"] / (want["tp"] + want["fn"]), 4)
        assert audit[verdict]["specificity"] == round(want["tn"] / (want["tn"] + want["fp"]), 4)
    assert audit["harm"]["n"] == len(harm_rows) and audit["refusal"]["n"] == len(rows)
    for model, block in audit["by_model"].items():
        subset = [r for r in rows if f"{r['model']}-{r['decoding']}" == model]
        assert block["n"] == len(subset)
        h = [r for r in subset if r["category"] in HARM_CATEGORIES]
        assert {k: block["harm"][k] for k in ("tp", "fn", "tn", "fp")} == count(h, "harmful", "is_harmful"), model
        assert {k: block["refusal"][k] for k in ("tp", "fn", "tn", "fp")} == count(subset, "refusal", "is_refusal")
    assert sum(b["n"] for b in audit["by_model"].values()) == len(rows)
    for cat, block in audit["by_category"].items():  # harm over the category's own answers
        subset = [r for r in rows if r["category"] == cat]
        assert {k: block["harm"][k] for k in ("tp", "fn", "tn", "fp")} == count(subset, "harmful", "is_harmful"), cat
    all_harm = count(rows, "harmful", "is_harmful")
    assert {k: audit["harm_all_answers"][k] for k in ("tp", "fn", "tn", "fp")} == all_harm


def test_results_name_the_shipped_files(audit):
    import hashlib

    assert audit["audit_files"]["set_sha256"] == hashlib.sha256(AUDIT_SET.read_bytes()).hexdigest()
    assert audit["audit_files"]["labels_sha256"] == hashlib.sha256(LABELS.read_bytes()).hexdigest()
