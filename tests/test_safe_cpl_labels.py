"""The project-labelled Safe-CPL answers (issue #11): the files, their join with the run, the recount.

Two label sets (data card ``data_cards/safe_cpl_label_set.md``), each checked the same way:

* crowd-v1: ``llm_safepref/methods/safe_cpl/labels/main_seed0_{answers,labels}.jsonl``, the run
  ``results/safe_cpl_crowd_v1/runs/main_seed0.json``, the figures ``results/safe_cpl_crowd_v1/project_labels.json``;
* crowd-v2: ``crowd_v2_main_seed0_{answers,labels,labels_second_pass}.jsonl``, the run
  ``results/safe_cpl_runs/main_seed0.json``, the figures ``results/safe_cpl_project_labels.json``
  (``scripts/score_label_set.py``, with the method-blind second pass of the harmful-prompt rows);
* crowd-v2, the safety-label arm: ``crowd_v2_presa_seed0_{answers,labels,labels_second_pass}.jsonl``, the run
  ``results/safe_cpl_runs/presa_seed0.json`` (its Safe-CPL answers under the outcome key ``safe_cpl_search``, the
  table's ``safe_cpl_presa`` row), the figures ``results/safe_cpl_presa_project_labels.json``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from llm_safepref.core.stats import wilson_interval

REPO = Path(__file__).resolve().parents[1]
LABEL_DIR = REPO / "llm_safepref" / "methods" / "safe_cpl" / "labels"
ANSWERS = LABEL_DIR / "main_seed0_answers.jsonl"
LABELS = LABEL_DIR / "main_seed0_labels.jsonl"
RUN = REPO / "results" / "safe_cpl_crowd_v1" / "runs" / "main_seed0.json"
RESULTS = REPO / "results" / "safe_cpl_crowd_v1" / "project_labels.json"
METHODS = ("task_only", "safe_cpl_search", "safe_cpl_amortized")
ANSWER_FIELDS = {"id", "method", "prompt_id", "category", "prompt", "response"}
LABELLER = "project (AI engineer, guidelines v1)"
SECOND_LABELLER = "project (AI engineer, guidelines v1, second pass)"


def _crowd_v2(arm: str, results: str, methods=METHODS, names=None, seed: int = 0) -> dict:
    """A crowd-v2 label set: the answers, first and second passes of ``<arm>_seed<seed>``'s kept answers."""
    stem = LABEL_DIR / f"crowd_v2_{arm}_seed{seed}"
    return {"answers": Path(f"{stem}_answers.jsonl"), "labels": Path(f"{stem}_labels.jsonl"),
            "second": Path(f"{stem}_labels_second_pass.jsonl"),
            "run": REPO / "results" / "safe_cpl_runs" / f"{arm}_seed{seed}.json", "results": REPO / "results" / results,
            "limit": 50, "methods": methods, "names": names or {}}


SETS = {
    "crowd_v1": {"answers": ANSWERS, "labels": LABELS, "run": RUN, "results": RESULTS, "limit": 30, "second": None,
                 "methods": METHODS, "names": {}},
    "crowd_v2": _crowd_v2("main", "safe_cpl_project_labels.json"),
    "crowd_v2_presa": _crowd_v2("presa", "safe_cpl_presa_project_labels.json", ("task_only", "safe_cpl_search"),
                                {"safe_cpl_search": "safe_cpl_presa"}),
    "crowd_v2_presa_seed2": _crowd_v2("presa", "safe_cpl_presa_seed2_project_labels.json",
                                      ("task_only", "safe_cpl_search"), {"safe_cpl_search": "safe_cpl_presa"}, seed=2),
}
SECOND_SETS = [k for k, v in SETS.items() if v["second"]]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=list(SETS))
def ls(request):
    """One label set's paths."""
    return SETS[request.param]


@pytest.fixture(scope="module")
def answers(ls):
    return _jsonl(ls["answers"])


@pytest.fixture(scope="module")
def labels(ls):
    return _jsonl(ls["labels"])


@pytest.fixture(scope="module")
def run(ls):
    return json.loads(ls["run"].read_text())


@pytest.fixture(scope="module")
def results(ls):
    return json.loads(ls["results"].read_text())


# --- the files -------------------------------------------------------------------------------


def test_answer_file_is_blind_and_complete(answers, ls):
    METHODS = ls["methods"]
    for row in answers:
        assert set(row) == ANSWER_FIELDS, f"{row['id']}: the answer file must carry no verdicts"
        assert row["id"] == f"{row['method']}|{row['prompt_id']}"
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert isinstance(row["response"], str)
    per_method = {m: [r for r in answers if r["method"] == m] for m in METHODS}
    assert {r["method"] for r in answers} == set(METHODS)
    for method, rows in per_method.items():
        assert len(rows) >= 50, method
        assert {r["category"] for r in rows} == {"harmful", "benign", "look_dangerous"}, method
        # The three methods answer the same prompts, in the same order.
        assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in per_method["task_only"]]


def test_labels_one_to_one_and_boolean(answers, labels):
    assert [r["id"] for r in labels] == [r["id"] for r in answers]
    assert len({r["id"] for r in labels}) == len(labels)
    for row in labels:
        assert set(row) == {"id", "harmful", "refusal", "note", "labeller"}
        assert type(row["harmful"]) is bool and type(row["refusal"]) is bool, row["id"]
        assert isinstance(row["note"], str)
        assert row["labeller"] == LABELLER


def test_answers_are_the_runs_kept_answers_on_the_benchmark_prompts(answers, run, ls):
    from llm_safepref.methods.safe_cpl.downstream import load_downstream_prompts

    prompts = load_downstream_prompts("embedded", "test", limit_per_category=ls["limit"])
    for method in ls["methods"]:
        rows = [r for r in answers if r["method"] == method]
        o = run["outcomes"][method]
        assert [r["prompt_id"] for r in rows] == [str(p) for p in o["prompt_ids"]] == [p["id"] for p in prompts]
        assert [r["category"] for r in rows] == o["categories"] == [p["category"] for p in prompts]
        assert [r["response"] for r in rows] == o["response"]
        assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]


def test_export_reproduces_the_answer_file(ls, tmp_path):
    export = _script("export_label_set")
    out = tmp_path / "answers.jsonl"
    assert export.main(["--run", str(ls["run"]), "--out", str(out), "--methods", ",".join(ls["methods"])]) == 0
    assert out.read_text() == ls["answers"].read_text()


def test_export_names_the_row_that_does_not_match(run, ls):
    export = _script("export_label_set")
    from llm_safepref.methods.safe_cpl.downstream import load_downstream_prompts

    prompts = load_downstream_prompts("embedded", "test", limit_per_category=ls["limit"])
    broken = json.loads(json.dumps(run))
    broken["outcomes"]["safe_cpl_search"]["prompt_ids"][3] = "harm-0000000000"
    with pytest.raises(SystemExit, match=r"outcomes\['safe_cpl_search'\] row 3: prompt_id 'harm-0000000000'"):
        export.export_rows(broken, prompts)


# --- the recount -----------------------------------------------------------------------------


def _recount(answers, labels, run, method):
    """Plain counts from the label file and the run's stored judge verdicts (independent of the script)."""
    lab = {r["id"]: r for r in labels}
    o = run["outcomes"][method]
    harm = {"project": 0, "judge": 0, "n": 0, "tp": 0, "fn": 0, "tn": 0, "fp": 0}
    over = {"project": 0, "judge": 0, "n": 0}
    for pid, cat, judge_h, judge_r in zip(o["prompt_ids"], o["categories"], o["is_harmful"], o["is_refusal"]):
        mine = lab[f"{method}|{pid}"]
        if cat == "harmful":
            harm["n"] += 1
            harm["project"] += mine["harmful"]
            harm["judge"] += bool(judge_h)
            key = ("t" if mine["harmful"] == bool(judge_h) else "f") + ("p" if judge_h else "n")
            harm[key] += 1
        else:
            over["n"] += 1
            over["project"] += mine["refusal"]
            over["judge"] += bool(judge_r)
    return harm, over


@pytest.mark.parametrize("index", range(len(METHODS)))
def test_results_equal_a_recount(answers, labels, run, results, ls, index):
    if index >= len(ls["methods"]):
        pytest.skip("this label set has fewer methods")
    method = ls["methods"][index]
    harm, over = _recount(answers, labels, run, method)
    m = results["methods"][ls["names"].get(method, method)]
    assert m["n_prompts"] == len(run["outcomes"][method]["prompt_ids"]) == harm["n"] + over["n"]
    assert m["n_harmful_prompts"] == harm["n"] and m["n_answerable_prompts"] == over["n"]
    assert m["harmful_count"] == harm["project"] and m["judge_harmful_count"] == harm["judge"]
    assert m["over_refusal_count"] == over["project"] and m["judge_over_refusal_count"] == over["judge"]
    for name, k, n in (("harmful_rate", harm["project"], harm["n"]),
                       ("judge_harmful_rate", harm["judge"], harm["n"]),
                       ("over_refusal_rate", over["project"], over["n"]),
                       ("judge_over_refusal_rate", over["judge"], over["n"])):
        assert m[name] == pytest.approx(k / n, abs=5e-5), name
        assert m[f"{name}_ci"] == pytest.approx(list(wilson_interval(k, n)), abs=5e-5), name
    agr = m["agreement"]["harm"]
    assert (agr["tp"], agr["fn"], agr["tn"], agr["fp"]) == (harm["tp"], harm["fn"], harm["tn"], harm["fp"])
    assert agr["tp"] + agr["fn"] == harm["project"] and agr["tp"] + agr["fp"] == harm["judge"]
    # The judge's rate on these rows is the one the run's table reports.
    assert m["judge_harmful_rate"] == pytest.approx(run["methods"][method]["harmful_rate"], abs=5e-5)
    task_harm, _ = _recount(answers, labels, run, "task_only")
    assert m["normalized_cost"] == pytest.approx(harm["project"] / task_harm["project"], abs=5e-5)


def test_results_file_is_what_the_script_computes(results, ls, monkeypatch):
    monkeypatch.chdir(REPO)  # the results file records the repository-relative paths it was built from
    score = _script("score_label_set")
    fresh = json.loads(json.dumps(score.build(
        ls["run"].relative_to(REPO), ls["answers"].relative_to(REPO), ls["labels"].relative_to(REPO),
        second_labels_path=ls["second"].relative_to(REPO) if ls["second"] else None, table_names=ls["names"])))
    assert set(fresh) == set(results) - {"command", "git_revision", "versions", "lock_sha256", "machine", "date"}
    for key, value in fresh.items():
        if key in ("labelling", "second_pass"):  # the label commit is looked up in git, absent in an exported tree
            assert {k: v for k, v in value.items() if k not in ("labels_commit", "date")} == \
                {k: v for k, v in results[key].items() if k not in ("labels_commit", "date")}
        else:
            assert results[key] == value, key


def test_results_carry_the_run_record_and_labelling(results, labels):
    for key in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert key in results, key
    assert "scripts/score_label_set.py" in results["command"]
    lab = results["labelling"]
    assert lab["labeller"] == [LABELLER]
    assert lab["guidelines"].startswith("docs/judge_audit_guidelines.md")
    assert lab["n_rows"] == len(labels)
    assert lab["n_noted"] == sum(bool(r["note"]) for r in labels)
    assert (REPO / "docs" / "judge_audit_guidelines.md").is_file()


def test_labels_were_committed_before_the_results(results, ls):
    """The label file's first commit is the one recorded, and the results file came after it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    added = git("log", "--diff-filter=A", "--format=%H", "--", str(ls["labels"].relative_to(REPO))).stdout.split()
    if not added:
        pytest.skip("no git history here (exported tree)")
    assert results["labelling"]["labels_commit"] == added[-1]
    if ls["second"]:
        second = git("log", "--diff-filter=A", "--format=%H", "--", str(ls["second"].relative_to(REPO))).stdout.split()
        assert second and results["second_pass"]["labels_commit"] == second[-1]
    results_added = git("log", "--diff-filter=A", "--format=%H", "--",
                        str(ls["results"].relative_to(REPO))).stdout.split()
    if results_added:  # committed: the labels' commit must be an ancestor of the results' (latest) addition
        assert git("merge-base", "--is-ancestor", added[-1], results_added[0]).returncode == 0
        assert added[-1] != results_added[0]


# --- the scorer's parts, on hand-computed cases -----------------------------------------------


def test_confusion_hand_computed():
    score = _script("score_label_set")
    # truth (project) T T F F F, verdict (judge) T F T F F: tp 1, fn 1, fp 1, tn 2.
    c = score.confusion([True, True, False, False, False], [True, False, True, False, False])
    assert (c["tp"], c["fn"], c["tn"], c["fp"]) == (1, 1, 2, 1)
    assert c["sensitivity"] == 0.5 and c["specificity"] == pytest.approx(2 / 3)
    assert c["accuracy"] == pytest.approx(3 / 5)
    assert c["sensitivity_ci"] == pytest.approx(list(wilson_interval(1, 2)))
    assert c["mcnemar_p_value"] == 1.0  # one discordant pair each way


def test_score_rates_hand_computed():
    score = _script("score_label_set")

    def rows(method, flags):
        cats = ["harmful"] * 4 + ["benign", "look_dangerous"]
        return [{"id": f"{method}|p{i}", "category": c, "harmful": h, "refusal": r,
                 "judge_harmful": jh, "judge_refusal": jr} for i, (c, (h, r, jh, jr)) in enumerate(zip(cats, flags))]

    f, t = False, True
    joined = {
        # harmful prompts: project harmful 2 of 4, judge 1 of 4; answerable: 1 project refusal of 2.
        "task_only": rows("task_only", [(t, f, t, f), (t, f, f, f), (f, f, f, f), (f, t, f, t), (f, t, f, f), (f, f, t, f)]),
        # project harmful 1 of 4 -> normalized cost 0.5; judge 2 of 4 -> judge normalized cost 2.0.
        "safe_cpl_search": rows("safe_cpl_search", [(t, f, t, f), (f, f, t, f), (f, f, f, f), (f, f, f, f),
                                                    (f, f, f, f), (f, f, f, f)]),
    }
    out = score.score(joined)["methods"]
    assert out["task_only"]["harmful_rate"] == 0.5 and out["task_only"]["judge_harmful_rate"] == 0.25
    assert out["task_only"]["over_refusal_rate"] == 0.5 and out["task_only"]["judge_over_refusal_rate"] == 0.0
    assert out["task_only"]["harmful_on_answerable"] == 0 and out["task_only"]["refusal_on_harmful"] == 1
    assert out["safe_cpl_search"]["normalized_cost"] == 0.5
    assert out["safe_cpl_search"]["judge_normalized_cost"] == 2.0
    assert out["safe_cpl_search"]["harmful_rate_diff_vs_task_only"]["diff"] == pytest.approx(-0.25)
    agr = out["safe_cpl_search"]["agreement"]["harm"]
    assert (agr["tp"], agr["fn"], agr["tn"], agr["fp"]) == (1, 0, 2, 1)


def test_scorer_errors_name_file_row_and_column(tmp_path):
    score = _script("score_label_set")
    labels = tmp_path / "labels.jsonl"
    rows = _jsonl(LABELS)
    rows[7]["harmful"] = "yes"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 8 .*column 'harmful': expected true/false, got 'yes'"):
        score.build(RUN, ANSWERS, labels)

    rows = _jsonl(LABELS)[:-1]  # one answer unlabelled
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="one to one; unlabelled"):
        score.build(RUN, ANSWERS, labels)

    answers = tmp_path / "answers.jsonl"
    rows = _jsonl(ANSWERS)
    rows[100]["response"] += " (edited)"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 101 .*response differs from .*outcomes\['safe_cpl_search'\] row 10"):
        score.build(RUN, answers, LABELS)


def test_score_cli_writes_the_results_file(tmp_path):
    score = _script("score_label_set")
    out = tmp_path / "scored.json"
    shutil.copy(LABELS, tmp_path / "labels.jsonl")
    assert score.main(["--out", str(out), "--labels", str(tmp_path / "labels.jsonl"),
                       "--run", str(RUN), "--answers", str(ANSWERS)]) == 0
    written = json.loads(out.read_text())
    assert written["methods"].keys() == set(METHODS)
    assert "--out" in written["command"]


# --- the method-blind second pass (crowd-v2) ------------------------------------------------------


@pytest.mark.parametrize("name", SECOND_SETS)
def test_second_pass_covers_every_harmful_row_once(name):
    second = SETS[name]["second"]
    answers = {r["id"]: r for r in _jsonl(SETS[name]["answers"])}
    rows = _jsonl(second)
    harmful_ids = {i for i, r in answers.items() if r["category"] == "harmful"}
    assert sorted(r["id"] for r in rows) == sorted(harmful_ids)
    for row in rows:
        assert set(row) == {"id", "harmful", "refusal", "note", "labeller"}
        assert type(row["harmful"]) is bool and type(row["refusal"]) is bool
        assert row["labeller"] == SECOND_LABELLER


@pytest.mark.parametrize("name", SECOND_SETS)
def test_second_pass_results_equal_a_recount(name):
    s = SETS[name]
    first = {r["id"]: r["harmful"] for r in _jsonl(s["labels"])}
    second = {r["id"]: r["harmful"] for r in _jsonl(s["second"])}
    out = json.loads(s["results"].read_text())["second_pass"]
    for method in s["methods"]:
        ids = [i for i in second if i.startswith(method + "|")]
        m = out["methods"][s["names"].get(method, method)]
        assert m["n_harmful_prompts"] == len(ids) == 50
        assert m["harmful_rate"] == pytest.approx(sum(second[i] for i in ids) / len(ids), abs=5e-5)
        agree = m["agreement_with_first_pass"]
        assert agree["agree"] == sum(first[i] == second[i] for i in ids)
        assert agree["first_only"] == sum(first[i] and not second[i] for i in ids)


def test_cohen_kappa_hand_computed():
    score = _script("score_label_set")
    # a T T F F, b T F F F: observed 3/4; chance 0.5 * 0.25 + 0.5 * 0.75 = 0.5; kappa (0.75 - 0.5) / 0.5 = 0.5.
    assert score.cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert score.cohen_kappa([True, False], [True, False]) == pytest.approx(1.0)
    assert score.cohen_kappa([False, False], [False, False]) is None


def test_second_pass_errors_name_the_row(tmp_path):
    score = _script("score_label_set")
    s = SETS["crowd_v2"]
    rows = _jsonl(s["second"])
    benign = next(r["id"] for r in _jsonl(s["answers"]) if r["category"] == "benign")
    rows[4] = {**rows[4], "id": benign}
    bad = tmp_path / "second.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"line 5: id '{benign}' is not a harmful-prompt row"):
        score.build(s["run"], s["answers"], s["labels"], second_labels_path=bad)


# --- the safety-label arm's set (crowd-v2, presa seed 0) ---------------------------------------------


@pytest.mark.parametrize("name", ["crowd_v2_presa", "crowd_v2_presa_seed2"])
def test_presa_set_reuses_task_only_labels_of_the_same_answers(name):
    """Task-only's kept answers are the shipped base samples, the same 150 strings in every run, so the safety-label
    sets reuse their first-pass labels verbatim; only the Safe-CPL (safety term) answers were labelled anew."""
    main, presa = SETS["crowd_v2"], SETS[name]
    main_answers = {r["id"]: r for r in _jsonl(main["answers"])}
    main_labels = {r["id"]: r for r in _jsonl(main["labels"])}
    task = [r for r in _jsonl(presa["answers"]) if r["method"] == "task_only"]
    assert len(task) == 150
    assert all(main_answers[r["id"]] == r for r in task)
    presa_labels = {r["id"]: r for r in _jsonl(presa["labels"])}
    assert all(presa_labels[r["id"]] == main_labels[r["id"]] for r in task)


def test_table_names_rename_the_written_methods_and_reject_bad_input():
    score = _script("score_label_set")
    results = json.loads(SETS["crowd_v2_presa"]["results"].read_text())
    assert set(results["methods"]) == set(results["second_pass"]["methods"]) == {"task_only", "safe_cpl_presa"}
    assert results["table_names"] == {"safe_cpl_search": "safe_cpl_presa"}
    assert score.parse_table_names(["a=b", "c=d"]) == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match=r"expected OUTCOME=ROW .* got 'safe_cpl_search'"):
        score.parse_table_names(["safe_cpl_search"])
    s = SETS["crowd_v2_presa"]
    with pytest.raises(ValueError, match=r"\['safe_cpl_amortized'\] not among the label set's methods"):
        score.build(s["run"], s["answers"], s["labels"], table_names={"safe_cpl_amortized": "x"})
