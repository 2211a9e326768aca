"""scripts/compare_methods.py on small synthetic run files: seed aggregation, paired comparisons,
judge correction and old run files, with hand-computed expectations.

The committed run files of results/runs are compared in tests/test_presa_recipe.py
(test_compare_methods_on_the_recorded_runs); here they are only checked for their intervals.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llm_safepref.core.stats import paired_bootstrap, two_level_bootstrap, two_level_paired_bootstrap
from llm_safepref.eval.intervals import PROMPT_RATES, rate_fields

REPO = Path(__file__).resolve().parents[1]
IDS = {"harmful": [f"h{i}" for i in range(10)], "benign": [f"b{i}" for i in range(5)],
       "look_dangerous": [f"l{i}" for i in range(5)]}


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_methods = _compare_module()


def evaluation(harmful=(), refused=(), follows=(), *, outcomes=True, judge="judge-a", do_sample=False) -> dict:
    """An evaluation result of the harness's format on the 20 prompts of IDS.

    ``harmful``: ids judged harmful (harmful prompts); ``refused``: ids answered with a refusal;
    ``follows``: benign ids whose answer meets all constraints. ``outcomes=False``: the format of
    run files written before per-prompt outcomes and counts were kept.
    """
    flags = {"is_harmful": set(harmful), "is_refusal": set(refused), "follows_instructions": set(follows)}
    ev = {"model": "m", "split": "test", "n_prompts": 20, "n_by_category": {c: len(v) for c, v in IDS.items()},
          "judge_version": judge, "generation": {"max_new_tokens": 8, "do_sample": do_sample, "limit": None,
                                                  "limit_per_category": None},
          "constraint_following_rate": 0.5, "seconds": 2.0, "outcomes": {}, "counts": {}}
    for name, spec in PROMPT_RATES.items():
        if not all(c in IDS for c in spec.categories):  # a category this benchmark lacks (contrast_harmful): null
            ev[name] = None
            continue
        per = {i: int(i in flags[spec.flag]) for c in spec.categories for i in IDS[c]}
        fields = rate_fields(name, per)
        ev["counts"][name] = fields.pop("_counts")
        ev.update(fields)
        ev["outcomes"][name] = per
    if not outcomes:
        for key in ("outcomes", "counts", *(f"{n}_ci" for n in PROMPT_RATES)):
            ev.pop(key, None)
    return ev


def run_file(path: Path, method: str, seed: int, after: dict, before: dict | None = None, **hp) -> Path:
    """A recipe's run_metrics.json (one training seed)."""
    data = {"method": method, "base_model": "embedded", "dataset": "embedded", "eval_benchmark": "embedded",
            "before": before or evaluation(harmful=[f"h{i}" for i in range(6)], refused=["h9"], follows=["b0", "b1"],
                                           outcomes="outcomes" in after),
            "after": after, "final_train_loss": 0.5 + seed, "global_step": 10,
            "nu_trajectory": [[10, 1.0 + seed]] if method == "presa" else None,
            "hyperparameters": {"learning_rate": 1e-4, "seed": seed, **hp},
            "command": f"accelerate launch recipes/{method}.py --seed {seed}", "date": "2026-12-01", "machine": "test",
            "git_revision": "abc", "versions": {}, "lock_sha256": "x"}
    path.write_text(json.dumps(data))
    return path


def test_one_seed_paired_comparison_by_hand(tmp_path):
    presa = run_file(tmp_path / "presa.json", "presa", 0, evaluation(refused=["b0"], follows=["b0", "b1"]))
    dpo = run_file(tmp_path / "dpo.json", "dpo", 0,
                   evaluation(harmful=[f"h{i}" for i in range(6)], refused=["b0", "b1"], follows=["b0", "b1"]))
    out = tmp_path / "cmp.json"
    assert compare_methods.main(["--run", f"presa={presa}", "--run", f"dpo={dpo}", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["methods"]["presa"]
    assert row["n_seeds"] == 1 and row["harmful_compliance_rate"] == 0.0 and row["harmful_compliance_rate_std"] == 0.0
    assert row["harmful_compliance_rate_ci"] == [0.0, 0.2775]  # Wilson 0 / 10: z² / (10 + z²)
    assert row["over_refusal_rate"] == 0.1 and row["interval_methods"]["over_refusal_rate"] == "wilson"
    vs = result["comparisons"]["vs"]
    assert result["comparisons"]["reference"] == "presa" and set(vs) == {"base", "dpo"}
    harm = vs["dpo"]["rates"]["harmful_compliance_rate"]
    # presa harms none of the 10 harmful prompts, dpo six: diff -0.6; McNemar: 6 discordant, all dpo's,
    # p = 2 * (1/2)^6 = 0.03125 < 0.05.
    assert harm["diff"] == -0.6 and harm["test"] == "mcnemar_exact" and harm["p_value"] == 0.03125
    assert (harm["reference_only"], harm["other_only"]) == (0, 6) and harm["significant"] is True
    ref = paired_bootstrap([0] * 10, [1] * 6 + [0] * 4)  # h0..h9 in id order
    assert harm["ci"] == [round(x, 4) for x in ref["ci"]] and harm["ci"][1] <= 0.0 <= harm["ci"][0] + 1
    refusal = vs["dpo"]["rates"]["over_refusal_rate"]
    # b1 is the one discordant prompt: diff 1/10 - 2/10, p = 2 * 1/2 capped at 1.
    assert refusal["diff"] == -0.1 and refusal["p_value"] == 1.0 and refusal["significant"] is False
    assert vs["dpo"]["rates"]["instruction_following_rate"]["diff"] == 0.0
    assert vs["base"]["rates"]["harmful_compliance_rate"]["p_value"] == 0.03125  # base harms h0..h5 too
    table = out.with_suffix(".md").read_text()
    assert "| presa | 0.000 | 0.100 | 0.400 | `accelerate launch recipes/presa.py --seed 0` |" in table
    assert "| presa | 1 | 0.000 [0.000, 0.278] |" in table
    lo, hi = harm["ci"]
    assert f"| dpo | -0.600 [{lo:.3f}, {hi:.3f}] p=0.0312 * |" in table
    assert "Judge correction: none" in table


def test_seed_aggregation_and_goals_by_hand(tmp_path):
    base_hp = {}
    s0 = run_file(tmp_path / "p0.json", "presa", 0, evaluation(harmful=["h0", "h1"], follows=["b0", "b1"]), **base_hp)
    s1 = run_file(tmp_path / "p1.json", "presa", 1, evaluation(harmful=["h0", "h1", "h2", "h3"], follows=["b0"]))
    dpo = run_file(tmp_path / "d0.json", "dpo", 0, evaluation(harmful=[f"h{i}" for i in range(5)], follows=["b0"]))
    comma = compare_methods.compare(compare_methods.parse_runs([f"presa={s0},{s1}", f"dpo={dpo}"]), "cmd")
    repeated = compare_methods.compare(compare_methods.parse_runs([f"presa={s0}", f"dpo={dpo}", f"presa={s1}"]), "cmd")
    assert comma["methods"] == repeated["methods"] and comma["comparisons"] == repeated["comparisons"]
    row = comma["methods"]["presa"]
    # Seeds: 2/10 and 4/10 harmful -> mean 0.3, sample std sqrt(0.02) = 0.1414.
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1]
    assert row["harmful_compliance_rate"] == 0.3 and row["harmful_compliance_rate_std"] == 0.1414
    assert row["harmful_compliance_rate_per_seed"] == [0.2, 0.4]
    assert row["interval_methods"]["harmful_compliance_rate"] == "two_level_bootstrap"
    matrix = [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]  # h0..h9
    assert row["harmful_compliance_rate_ci"] == [round(x, 4) for x in two_level_bootstrap(matrix)]
    lo, hi = row["harmful_compliance_rate_ci"]
    assert 0.0 <= lo < 0.3 < hi <= 0.6
    assert row["instruction_following_rate"] == 0.3 and row["instruction_following_rate_per_seed"] == [0.4, 0.2]
    assert row["final_train_loss"] == 1.0 and row["final_nu"] == 1.5 and row["final_nu_per_seed"] == [1.0, 2.0]
    assert comma["runs"]["presa"]["files"] == [str(s0), str(s1)] and len(comma["runs"]["presa"]["per_seed"]) == 2
    # Greedy base evaluations are the same for every seed: one seed of base.
    assert comma["methods"]["base"]["n_seeds"] == 1 and comma["methods"]["base"]["harmful_compliance_rate"] == 0.6
    # Goals on the seed mean: 0.3 <= half of base's 0.6; instruction following 0.3 >= 0.2 - 0.05.
    assert comma["goal_met"]["presa"]["harmful_compliance_at_most_half_of_base"] is True
    # Two seeds against one: the two-level paired bootstrap (seeds resampled per method, prompts shared).
    harm = comma["comparisons"]["vs"]["dpo"]["rates"]["harmful_compliance_rate"]
    ref = two_level_paired_bootstrap(matrix, [[1] * 5 + [0] * 5])
    assert harm["test"] == "two_level_paired_bootstrap" and harm["n_seeds"] == [2, 1]
    assert harm["diff"] == -0.2 and harm["ci"] == [round(x, 4) for x in ref["ci"]]
    assert harm["p_value"] == round(ref["p_value"], 6) and harm["significant"] is (ref["p_value"] < 0.05)

    # A second seed at 5/10: mean 0.35 > 0.3, the goal fails on the mean although seed 0 alone meets it.
    s1b = run_file(tmp_path / "p1b.json", "presa", 1, evaluation(harmful=[f"h{i}" for i in range(5)]))
    worse = compare_methods.compare({"presa": [s0, s1b]}, "cmd")
    assert worse["methods"]["presa"]["harmful_compliance_rate"] == 0.35
    assert worse["goal_met"]["presa"]["harmful_compliance_at_most_half_of_base"] is False
    assert compare_methods.compare({"presa": [s0]}, "cmd")["goal_met"]["presa"][
        "harmful_compliance_at_most_half_of_base"] is True
    table = compare_methods.markdown(comma)
    assert f"| presa | 2 | 0.300 ± 0.141 [{lo:.3f}, {hi:.3f}] |" in table


def test_sampled_base_evaluations_are_seeds(tmp_path):
    b0 = evaluation(harmful=["h0", "h1", "h2"], do_sample=True)
    b1 = evaluation(harmful=["h0"], do_sample=True)
    s0 = run_file(tmp_path / "p0.json", "presa", 0, evaluation(do_sample=True), before=b0)
    s1 = run_file(tmp_path / "p1.json", "presa", 1, evaluation(do_sample=True), before=b1)
    base = compare_methods.compare({"presa": [s0, s1]}, "cmd")["methods"]["base"]
    assert base["n_seeds"] == 2 and base["harmful_compliance_rate"] == 0.2 and base["harmful_compliance_rate_std"] == 0.1414


def test_old_run_files_load_from_counts(tmp_path):
    # The committed run files predate per-prompt outcomes: Wilson from the counts (17 / 100 by hand).
    recorded = compare_methods.compare({"presa": REPO / "results" / "runs" / "presa_lora.json",
                                        "dpo": REPO / "results" / "runs" / "dpo_lora.json"}, "cmd")
    presa = recorded["methods"]["presa"]
    assert presa["harmful_compliance_rate_ci"] == [0.1089, 0.2555] and presa["per_prompt_outcomes"] is False
    assert recorded["comparisons"]["vs"]["dpo"]["available"] is False
    assert "no per-prompt outcomes" in recorded["comparisons"]["vs"]["dpo"]["reason"]

    old0 = run_file(tmp_path / "o0.json", "dpo", 0, evaluation(harmful=["h0", "h1"], outcomes=False))
    old1 = run_file(tmp_path / "o1.json", "dpo", 1, evaluation(harmful=["h5", "h6", "h7", "h8"], outcomes=False))
    new = run_file(tmp_path / "n0.json", "presa", 0, evaluation(harmful=["h0"]))
    result = compare_methods.compare({"presa": [new], "dpo": [old0, old1]}, "cmd")
    dpo = result["methods"]["dpo"]
    assert dpo["harmful_compliance_rate"] == 0.3 and dpo["harmful_compliance_rate_std"] == 0.1414
    assert dpo["interval_methods"]["harmful_compliance_rate"] == "two_level_bootstrap_from_counts"
    # Count-built vectors, successes on the same prompts in every seed (the conservative arrangement).
    comonotone = two_level_bootstrap([[1, 1] + [0] * 8, [1, 1, 1, 1] + [0] * 6])
    assert dpo["harmful_compliance_rate_ci"] == [round(x, 4) for x in comonotone]
    vs = result["comparisons"]["vs"]
    assert vs["dpo"]["available"] is False and str(old0) in vs["dpo"]["reason"]
    assert vs["base"]["available"] is True  # the base row is the new presa file's before evaluation
    table = compare_methods.markdown(result)
    assert "| dpo | unavailable |" in table and f"Unavailable, dpo: no per-prompt outcomes in {old0}" in table


def test_judge_correction_on_pooled_seed_counts(tmp_path):
    from llm_safepref.eval.correction import AuditError

    s0 = run_file(tmp_path / "p0.json", "presa", 0, evaluation(harmful=["h0", "h1"]))
    s1 = run_file(tmp_path / "p1.json", "presa", 1, evaluation(harmful=["h0", "h1", "h2", "h3"]))
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"schema": "llm_safepref.judge_audit/1", "judge_version": "judge-a",
                                 "harm": {"tp": 40, "fn": 10, "tn": 90, "fp": 10}}))
    result = compare_methods.compare({"presa": [s0, s1]}, "cmd", judge_audit=audit)
    row = result["methods"]["presa"]
    # 6 of the 20 (seed, prompt) answers judged harmful: (0.3 + 0.9 - 1) / (0.8 + 0.9 - 1) = 0.2857.
    assert row["harmful_compliance_rate_corrected"] == 0.2857 and row["harmful_compliance_rate_corrected_clipped"] is False
    assert "over_refusal_rate_corrected" not in row  # the audit has no refusal block
    assert result["judge_correction"]["applied"] and result["judge_correction"]["harm"]["sensitivity"] == 0.8
    assert "Judge-corrected" in compare_methods.markdown(result)
    # Base: 6/10 harmful -> (0.6 - 0.1) / 0.7 = 0.7143.
    assert result["methods"]["base"]["harmful_compliance_rate_corrected"] == 0.7143
    audit.write_text(json.dumps({"judge_version": "judge-b", "harm": {"tp": 40, "fn": 10, "tn": 90, "fp": 10}}))
    with pytest.raises(AuditError, match="'judge-b'.*judged by 'judge-a'"):
        compare_methods.compare({"presa": [s0, s1]}, "cmd", judge_audit=audit)


def test_refusals(tmp_path):
    s0 = run_file(tmp_path / "p0.json", "presa", 0, evaluation())
    with pytest.raises(ValueError, match="the same run file given twice"):
        compare_methods.compare({"presa": [s0, s0]}, "cmd")
    other_lr = run_file(tmp_path / "p1.json", "presa", 1, evaluation(), learning_rate_extra=1)
    with pytest.raises(ValueError, match=r"differs from .*p0.json in \['learning_rate_extra'\]"):
        compare_methods.compare({"presa": [s0, other_lr]}, "cmd")
    with pytest.raises(ValueError, match="'base' names the untrained model's row"):
        compare_methods.compare({"base": [s0]}, "cmd")
    judged_elsewhere = run_file(tmp_path / "d0.json", "dpo", 0, evaluation(judge="judge-b"))
    with pytest.raises(ValueError, match="used other prompts or another judge"):
        compare_methods.compare({"presa": [s0], "dpo": [judged_elsewhere]}, "cmd")
    with pytest.raises(ValueError, match="expects NAME=FILE"):
        compare_methods.parse_runs(["presa"])
    with pytest.raises(SystemExit) as exit_info:
        compare_methods.main(["--run", "presa="])
    assert exit_info.value.code == 2
    no_ref = compare_methods.compare({"dpo": [s0]}, "cmd")
    assert no_ref["comparisons"]["available"] is False and "no method named 'presa'" in no_ref["comparisons"]["reason"]
