"""Evaluation harness: a tiny real run (tiny model, small benchmark), the stratified subset, the
intervals / counts / per-prompt outcomes of every rate, judge-error correction, plug-in judges, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_safepref.eval import evaluate, results_markdown, stratified_subset, write_results  # noqa: E402


def test_stratified_subset_is_fixed_and_stratified():
    rows = [{"id": f"h{i}", "category": "harmful"} for i in range(60)]
    rows += [{"id": f"b{i}", "category": "benign"} for i in range(30)]
    rows += [{"id": f"l{i}", "category": "look_dangerous"} for i in range(10)]
    sub = stratified_subset(rows, 10)
    assert len(sub) == 10
    counts = {c: sum(r["category"] == c for r in sub) for c in ("harmful", "benign", "look_dangerous")}
    assert counts == {"harmful": 6, "benign": 3, "look_dangerous": 1}
    assert [r["id"] for r in stratified_subset(list(reversed(rows)), 10)] == [r["id"] for r in sub]
    assert len(stratified_subset(rows, 3)) == 3 and len({r["category"] for r in stratified_subset(rows, 3)}) == 3
    assert stratified_subset(rows, None) == rows
    with pytest.raises(ValueError):
        stratified_subset(rows, 0)
    # per_category caps each category, keeping the same hash ranking inside it.
    capped = stratified_subset(rows, None, per_category=12)
    assert {c: sum(r["category"] == c for r in capped) for c in ("harmful", "benign", "look_dangerous")} == {
        "harmful": 12, "benign": 12, "look_dangerous": 10}
    assert [r["id"] for r in stratified_subset(list(reversed(rows)), None, per_category=12)] == [r["id"] for r in capped]
    assert {r["id"] for r in stratified_subset(rows, None, per_category=6)} <= {r["id"] for r in capped}
    with pytest.raises(ValueError):
        stratified_subset(rows, None, per_category=0)


@pytest.fixture(scope="module")
def small_bench(tiny_model_path):
    from fixtures.small_benchmark import small_benchmark

    return small_benchmark(tiny_model_path)


def test_tiny_evaluation_run(tiny_model_path, small_bench, tmp_path):
    result = evaluate(str(tiny_model_path), benchmark=str(small_bench), split="test", limit=6, max_new_tokens=8,
                      batch_size=4, preference_pairs=2, progress=False, keep_generations=True)
    for key in ("harmful_compliance_rate", "over_refusal_rate", "instruction_following_rate", "n_prompts", "judge_version"):
        assert key in result
    assert result["n_prompts"] == 6
    # safety-v3 builds (the fixture is one) have the contrast category too.
    assert set(result["n_by_category"]) == {"harmful", "benign", "look_dangerous", "contrast_harmful"}
    assert all(v >= 1 for v in result["n_by_category"].values())
    for key in ("harmful_compliance_rate", "over_refusal_rate", "instruction_following_rate"):
        assert 0.0 <= result[key] <= 1.0
    assert result["judge_version"].startswith("minilm-probe-v2+")
    assert result["preference"]["n_pairs"] == 2 and 0.0 <= result["preference"]["preference_accuracy"] <= 1.0
    assert len(result["generations"]) == 6 and all("response" in g for g in result["generations"])
    # The rates are the means of the per-prompt verdicts kept in the generations.
    gens = result["generations"]
    harmful = [g for g in gens if g["category"] == "harmful"]
    # Over-refusal is over benign + look-dangerous prompts; the harmful contrast prompts are not in it.
    not_harmful = [g for g in gens if g["category"] in ("benign", "look_dangerous")]
    assert result["harmful_compliance_rate"] == round(float(np.mean([g["is_harmful"] for g in harmful])), 4)
    assert result["over_refusal_rate"] == round(float(np.mean([g["is_refusal"] for g in not_harmful])), 4)
    benign = [g for g in gens if g["category"] == "benign" and g["constraints_ok"]]
    assert result["instruction_following_rate"] == round(float(np.mean([all(g["constraints_ok"]) for g in benign])), 4)
    # Preference pairs are tokenised as the recipes train them.
    assert result["preference"]["preparation"] == {"as": "trl.DPOTrainer", "max_length": 160,
                                                   "truncation_mode": "keep_start", "conversational": True}
    from llm_safepref.judge import default_weights_path

    assert result["judge"] == {"version": result["judge_version"], "feature_set": "v2",
                               "weights": str(default_weights_path())}

    json_path, md_path = write_results(dict(result, command="pytest"), tmp_path / "eval.json")
    saved = json.loads(json_path.read_text())
    assert saved["n_prompts"] == 6 and "generations" not in saved
    assert "| harmful_compliance_rate |" in md_path.read_text()
    assert (tmp_path / "eval.generations.jsonl").exists()
    assert "over_refusal_rate" in results_markdown(result)
    # The run record of llm_safepref.core.provenance, not a local one.
    assert saved["command"] == "pytest" and saved["versions"]["trl"] and saved["machine"] and saved["date"]
    assert {"git_revision", "lock_sha256"} <= set(saved) and saved["judge"] == result["judge"]
    assert saved["preference"] == result["preference"]  # nothing in it mistaken for a secret by the redaction
    assert "Command: `pytest`" in md_path.read_text()

    # Every rate carries its Wilson interval over prompts, its count and its per-prompt outcomes.
    from llm_safepref.core.stats import wilson_interval
    from llm_safepref.eval import PROMPT_RATES

    assert result["interval"] == "wilson" and result["confidence"] == 0.95
    by_id = {g["id"]: g for g in gens}
    flag = {"is_harmful": lambda g: g["is_harmful"], "is_refusal": lambda g: g["is_refusal"],
            "follows_instructions": lambda g: all(g["constraints_ok"])}
    for name, spec in PROMPT_RATES.items():
        expected = {g["id"]: int(flag[spec.flag](g)) for g in gens if g["category"] in spec.categories
                    and (spec.flag != "follows_instructions" or g["constraints_ok"])}
        assert result["outcomes"][name] == expected, name
        k, n = sum(expected.values()), len(expected)
        assert result["counts"][name] == {"k": k, "n": n}
        assert result[name] == round(k / n, 4)
        assert result[f"{name}_ci"] == [round(x, 4) for x in wilson_interval(k, n)], name
        assert all(by_id[i]["category"] in spec.categories for i in result["outcomes"][name])
    assert result["counts"]["over_refusal_rate"]["n"] == result["n_by_category"]["benign"] + result["n_by_category"]["look_dangerous"]
    assert list(result).index("harmful_compliance_rate_ci") == list(result).index("harmful_compliance_rate") + 1
    pref = result["preference"]
    assert len(result["outcomes"]["preference_accuracy"]) == 2 and "outcomes" not in pref
    assert pref["counts"] == {"k": sum(result["outcomes"]["preference_accuracy"].values()), "n": 2}
    assert pref["preference_accuracy_ci"] == [round(x, 4) for x in wilson_interval(pref["counts"]["k"], 2)]
    lo, hi = pref["logp_margin_mean_ci"]
    assert lo <= pref["logp_margin_mean"] <= hi
    # No audit: no corrected figures, and the result says so once.
    assert not [k for k in result if k.endswith("_corrected")]
    assert result["judge_correction"]["applied"] is False and "--judge_audit" in result["judge_correction"]["reason"]
    assert result["judge_kind"] == "packaged"
    assert saved["outcomes"] == result["outcomes"] and saved["counts"] == result["counts"]
    md = md_path.read_text()
    assert md.count("Judge correction: none") == 1
    k, n = result["counts"]["harmful_compliance_rate"]["k"], result["counts"]["harmful_compliance_rate"]["n"]
    lo, hi = result["harmful_compliance_rate_ci"]
    assert f"| harmful_compliance_rate | {k / n:.3f} [{lo:.3f}, {hi:.3f}] | {n} | lower |" in md


def test_tiny_evaluation_with_adapter(tiny_model_path, small_bench, tmp_path):
    """A PEFT adapter on top of the base: the reference for preference margins is the base itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    result = evaluate(str(tiny_model_path), adapter=str(tmp_path / "adapter"), benchmark=str(small_bench), limit=3,
                      max_new_tokens=4, batch_size=4, preference_pairs=2, progress=False)
    assert result["adapter"] == str(tmp_path / "adapter")
    assert result["preference"]["preference_kind"] == "implicit_reward_vs_reference"
    # The adapter (random, non-zero LoRA weights) really moves the log-probs away from the base.
    assert result["preference"]["reward_margin_mean"] != 0.0


# --------------------------------------------------------------------------- pairs tokenised as training does

PAIRS = [
    dict(prompt="How do I bake bread at home?", chosen="Mix flour, water, salt and yeast, then bake.", rejected="No."),
    dict(prompt="word " * 60, chosen="the prompt alone fills max_length", rejected="x"),
    dict(prompt="Tell me about bees.", chosen="Bees make honey in hives. " * 8, rejected="Bees are fish."),
    dict(prompt="Name a colour.", chosen="Blue.", rejected="I can't help with that."),
]


def _conversational(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


@pytest.mark.parametrize("conversational", [True, False], ids=["chat", "text"])
def test_scored_token_ids_are_the_trainers(tiny_model_path, tmp_path, conversational):
    """The ids evaluation scores equal what TRL's DPOTrainer prepares and collates for the same rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from llm_safepref.eval import _collate, preference_examples
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    max_length = 40
    rows = _conversational(PAIRS) if conversational else PAIRS
    trainer = DPOTrainer(model, args=DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to="none",
                                               bf16=False), train_dataset=Dataset.from_list(rows), processing_class=tok)
    trained = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
    kept, scored = preference_examples(PAIRS, tok, max_length=max_length, conversational=conversational)
    assert kept == [0, 2, 3]  # row 1's prompt alone is longer than 40 tokens: TRL drops it, so do we
    assert scored == trained
    ours = _collate(scored, tok.pad_token_id, max_length, "keep_start")
    theirs = trainer.data_collator(trained)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[1] == max_length  # row 2's long chosen response was cut at max_length
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first = scored[0]["chosen_ids"]
    assert end in first[-2:]  # the response ends with the end-of-turn token (template or appended EOS)
    if not conversational:
        assert tok.decode(scored[0]["prompt_ids"]) == PAIRS[0]["prompt"]


def test_sequence_logps_match_a_full_forward(tiny_model_path):
    """The memory-light scorer (projects only completion positions) equals a plain full forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.eval import _collate, _sequence_logps, preference_examples

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    _, examples = preference_examples([PAIRS[0], PAIRS[3]], tok, max_length=160)
    batch = _collate(examples, tok.pad_token_id, 160, "keep_start")
    sums, counts = _sequence_logps(model, batch)
    for i in range(batch["input_ids"].shape[0]):  # chosen rows, then rejected rows
        n = int(batch["attention_mask"][i].sum())
        ids, comp = batch["input_ids"][i, :n], batch["completion_mask"][i, :n]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1)  # (T-1, V)
        ref = sum(logp[k - 1, ids[k]].item() for k in range(1, n) if comp[k])
        assert abs(sums[i].item() - ref) < 1e-3 and counts[i].item() == int(comp[1:].sum())
    pair = examples[0]
    assert counts[0].item() == len(pair["chosen_ids"]) and counts[2].item() == len(pair["rejected_ids"])


def test_pair_logps_keep_input_order_whatever_the_batching(tiny_model_path):
    """Scoring batches in length order must still return one row per kept pair, in input order."""
    from llm_safepref.eval import pair_logps
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    pairs = PAIRS + [dict(prompt="hi", chosen="a much longer completion with many words in it", rejected="no"),
                     dict(prompt="why", chosen="because of the weather today", rejected="fine")]
    kept, batched = pair_logps(model, tok, pairs, batch_size=2, max_length=40)
    assert kept == [0, 2, 3, 4, 5] and batched.shape == (5, 4)
    single = [pair_logps(model, tok, [pairs[i]], batch_size=1, max_length=40)[1][0] for i in kept]
    assert np.allclose(batched, np.asarray(single), atol=1e-4)
    assert len(set(batched[:, 1].tolist())) > 1  # different completion lengths really were scored


def test_preference_accuracy_flips_when_pairs_are_swapped(tiny_model_path):
    """Without a reference: accuracy(pairs) + accuracy(swapped pairs) = 1 (no ties), margins negate."""
    from llm_safepref.eval import _preference_metrics
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    pairs = [PAIRS[0], PAIRS[2], PAIRS[3]]
    swapped = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    settings = dict(reference=None, adapter=None, batch_size=2, max_length=160, conversational=True)
    a, b = _preference_metrics(model, tok, pairs, **settings), _preference_metrics(model, tok, swapped, **settings)
    assert a["n_pairs"] == b["n_pairs"] == 3 and a["preference_kind"] == "mean_token_logp"
    assert a["preference_accuracy"] + b["preference_accuracy"] == pytest.approx(1.0)
    assert a["logp_margin_mean"] == pytest.approx(-b["logp_margin_mean"], abs=1e-4)
    same = [dict(p, rejected=p["chosen"]) for p in pairs]  # identical responses: never "preferred"
    tie = _preference_metrics(model, tok, same, **settings)
    assert tie["preference_accuracy"] == 0.0 and tie["logp_margin_mean"] == 0.0


def test_eval_cli_help_and_flag_spellings():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "llm_safepref.eval", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for flag in ("--preference_pairs", "--max_length", "--conversational", "--judge_weights", "--limit_per_category",
                 "--judge", "--judge_harmful_label", "--judge_audit"):
        assert flag in out.stdout
    from llm_safepref.eval.__main__ import build_parser

    snake = build_parser().parse_args(["--batch_size", "4", "--limit_per_category", "3", "--conversational", "false"])
    kebab = build_parser().parse_args(["--batch-size", "4", "--limit-per-category", "3", "--conversational", "false"])
    assert snake == kebab and snake.batch_size == 4 and snake.conversational is False and snake.max_length == 160


# --------------------------------------------------------------------------- intervals, counts, correction

def test_wilson_fields_by_hand():
    """Wilson 95 % intervals worked out by hand (z = 1.959964)."""
    from llm_safepref.eval.intervals import rate_fields

    # 17 / 100: centre (0.17 + z²/200) / (1 + z²/100) = 0.182208, half-width 0.073272.
    f = rate_fields("harmful_compliance_rate", {f"p{i}": int(i < 17) for i in range(100)})
    assert f["harmful_compliance_rate"] == 0.17 and f["harmful_compliance_rate_ci"] == [0.1089, 0.2555]
    assert f["_counts"] == {"k": 17, "n": 100}
    # 0 / 4: [0, z² / (n + z²)] = [0, 3.841459 / 7.841459].
    f = rate_fields("r", {"a": 0, "b": 0, "c": 0, "d": 0})
    assert f["r"] == 0.0 and f["r_ci"] == [0.0, 0.4899]
    # 4 / 4 mirrors it; no prompt at all: no rate and no interval (never NaN in a JSON file).
    assert rate_fields("r", {"a": 1, "b": 1, "c": 1, "d": 1})["r_ci"] == [0.5101, 1.0]
    assert rate_fields("r", {}) == {"r": None, "r_ci": None, "_counts": {"k": 0, "n": 0}}


def test_counts_of_old_results():
    """Results written before counts were kept: k is rebuilt from the rounded rate and the category counts."""
    from llm_safepref.eval.intervals import CountsError, counts_of

    old = {"harmful_compliance_rate": 0.17, "over_refusal_rate": 0.069, "look_dangerous_refusal_rate": 0.1111,
           "instruction_following_rate": 0.39, "n_by_category": {"harmful": 100, "benign": 100, "look_dangerous": 45},
           "preference": {"preference_accuracy": 0.35, "n_pairs": 140}}
    assert counts_of(old, "harmful_compliance_rate") == {"k": 17, "n": 100}
    assert counts_of(old, "over_refusal_rate") == {"k": 10, "n": 145}  # 10 / 145 = 0.06897
    assert counts_of(old, "look_dangerous_refusal_rate") == {"k": 5, "n": 45}
    assert counts_of(old, "instruction_following_rate") == {"k": 39, "n": 100}
    assert counts_of(old, "preference_accuracy") == {"k": 49, "n": 140}
    assert counts_of(old, "benign_refusal_rate") is None  # not recorded
    new = dict(old, counts={"harmful_compliance_rate": {"k": 3, "n": 9}})
    assert counts_of(new, "harmful_compliance_rate") == {"k": 3, "n": 9}  # recorded counts win
    with pytest.raises(CountsError, match=r"old.json: over_refusal_rate = 0.0705 is no count out of 145 prompts"):
        counts_of(dict(old, over_refusal_rate=0.0705), "over_refusal_rate", source="old.json")
    with pytest.raises(CountsError, match="not recorded"):
        counts_of({"harmful_compliance_rate": 0.5}, "harmful_compliance_rate")


def test_rogan_gladen_correction_by_hand():
    from llm_safepref.eval.correction import audit_block, audit_block_from_labels, correction_fields

    harm = audit_block(tp=40, fn=10, tn=90, fp=10)  # se 0.8, sp 0.9
    assert harm["sensitivity"] == 0.8 and harm["specificity"] == 0.9
    assert harm["sensitivity_ci"] == [0.6696, 0.8876]  # Wilson 40 / 50 by hand
    assert audit_block_from_labels([1] * 50 + [0] * 100, [1] * 40 + [0] * 10 + [0] * 90 + [1] * 10) == harm
    counts = {"harmful_compliance_rate": {"k": 17, "n": 100}, "over_refusal_rate": {"k": 3, "n": 50},
              "instruction_following_rate": {"k": 30, "n": 50}}
    fields, record = correction_fields(counts, {"harm": harm, "judge_version": "j", "_path": "audit.json"})
    # (0.17 + 0.9 - 1) / (0.8 + 0.9 - 1) = 0.07 / 0.7 = 0.1
    assert fields["harmful_compliance_rate_corrected"] == 0.1
    assert fields["harmful_compliance_rate_corrected_clipped"] is False
    lo, hi = fields["harmful_compliance_rate_corrected_ci"]
    assert 0.0 <= lo < 0.1 < hi <= 1.0 and hi - lo > 0.1  # wider than the judged rate's own Wilson interval
    assert "instruction_following_rate_corrected" not in fields  # checked, not judged
    assert "over_refusal_rate_corrected" not in fields and "refusal" in record["not_corrected"]["over_refusal_rate"]
    assert record["applied"] is True and record["harm"]["tp"] == 40 and record["audit"] == "audit.json"
    # 5 / 100 judged harmful: (0.05 - 0.1) / 0.7 < 0, clipped to 0 and flagged as bounds.
    fields, _ = correction_fields({"harmful_compliance_rate": {"k": 5, "n": 100}}, {"harm": harm})
    assert fields["harmful_compliance_rate_corrected"] == 0.0 and fields["harmful_compliance_rate_corrected_clipped"]
    assert correction_fields(counts, None)[0] == {}


def test_audit_file_schema_and_checks(tmp_path):
    from llm_safepref.eval.correction import AuditError, audit_block, load_audit, write_audit
    from llm_safepref.judge import load_judge

    judge = load_judge()
    path = write_audit(tmp_path / "judge_audit.json", judge, audit_set="100 hand-labelled test answers",
                       harm=audit_block(40, 10, 90, 10), refusal=audit_block(45, 5, 95, 5), command="pytest")
    raw = json.loads(path.read_text())
    assert raw["schema"] == "llm_safepref.judge_audit/1" and raw["judge_version"] == judge.version
    assert raw["judge"] == judge.identity() and raw["command"] == "pytest" and raw["date"]
    assert set(raw["harm"]) == {"tp", "fn", "tn", "fp", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci"}
    audit = load_audit(path, judge.version)
    assert audit["refusal"]["sensitivity"] == 0.9 and audit["_path"] == str(path)
    with pytest.raises(AuditError, match="audits judge .* but the rates were judged by 'other-judge'"):
        load_audit(path, "other-judge")

    def bad(**change):
        data = json.loads(path.read_text())
        for key, value in change.items():
            if value is None:
                data.pop(key)
            else:
                data[key] = value
        (tmp_path / "bad.json").write_text(json.dumps(data))
        return tmp_path / "bad.json"

    with pytest.raises(AuditError, match=r"field 'harm'.sensitivity = 0.7 disagrees with its counts \(0.8"):
        load_audit(bad(harm={**raw["harm"], "sensitivity": 0.7}))
    with pytest.raises(AuditError, match=r"field 'refusal': missing count\(s\) \['fp'\]"):
        load_audit(bad(refusal={"tp": 1, "fn": 1, "tn": 1}))
    with pytest.raises(AuditError, match="field 'harm': tp must be a count"):
        load_audit(bad(harm={"tp": -1, "fn": 1, "tn": 1, "fp": 1}))
    with pytest.raises(AuditError, match="'judge_version' missing"):
        load_audit(bad(judge_version=None))
    with pytest.raises(AuditError, match="neither a 'harm' nor a 'refusal' block"):
        load_audit(bad(harm=None, refusal=None))
    with pytest.raises(AuditError, match="no such file"):
        load_audit(tmp_path / "none.json")


# --------------------------------------------------------------------------- plug-in judges in the evaluation

def odd_length_judge(prompts, responses):
    """A plug-in judge for the tests: harmful = odd-length answer; refusal = under 12 characters."""
    return [len(r) % 2 == 1 for r in responses], [len(r.strip()) < 12 for r in responses]


def test_evaluation_with_a_callable_judge_and_an_audit(tiny_model_path, small_bench, tmp_path):
    from llm_safepref.eval.correction import audit_block, correct_counts, write_audit
    from llm_safepref.judge.plugins import CallableJudge

    spec = "test_eval:odd_length_judge"
    harm, refusal = audit_block(30, 10, 50, 10), audit_block(20, 5, 60, 15)
    audit = write_audit(tmp_path / "audit.json", CallableJudge(spec), audit_set="synthetic", harm=harm, refusal=refusal)
    result = evaluate(str(tiny_model_path), benchmark=str(small_bench), limit=6, max_new_tokens=8, batch_size=4,
                      progress=False, keep_generations=True, judge=spec, judge_audit=audit)
    gens = result["generations"]
    harmful = [g for g in gens if g["category"] == "harmful"]
    assert [g["is_harmful"] for g in gens] == [len(g["response"]) % 2 == 1 for g in gens]
    assert result["harmful_compliance_rate"] == round(float(np.mean([len(g["response"]) % 2 for g in harmful])), 4)
    assert result["judge_kind"] == "callable" and result["judge"]["path"] == spec
    assert result["judge"]["refusal_verdicts"] == "callable" and result["judge_version"].startswith(f"callable:{spec}+")
    assert result["mean_harm_score_harmful"] is None  # the callable gives no scores
    # Every judged rate is corrected by its own audit block; instruction following is not judged.
    for name, block in [("harmful_compliance_rate", harm), ("harmful_refusal_rate", refusal),
                        ("over_refusal_rate", refusal), ("benign_refusal_rate", refusal),
                        ("look_dangerous_refusal_rate", refusal)]:
        c = result["counts"][name]
        fixed = correct_counts(c["k"], c["n"], block)
        assert (result[f"{name}_corrected"], result[f"{name}_corrected_ci"],
                result[f"{name}_corrected_clipped"]) == (fixed["rate"], fixed["ci"], fixed["clipped"]), name
        keys = list(result)
        assert keys.index(f"{name}_corrected") == keys.index(f"{name}_ci") + 1  # beside the rate
    assert "instruction_following_rate_corrected" not in result
    assert result["judge_correction"]["applied"] and result["judge_correction"]["audit"] == str(audit)
    md = results_markdown(result)
    assert "judge-corrected [95% CI]" in md and "Judge correction: none" not in md
    # An audit of another judge is refused before anything is generated.
    from llm_safepref.eval.correction import AuditError

    with pytest.raises(AuditError, match="an audit corrects only the judge it measured"):
        evaluate(str(tiny_model_path), benchmark=str(small_bench), limit=3, progress=False, judge_audit=audit)


def test_evaluation_with_an_hf_classifier_judge(tiny_model_path, small_bench, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from llm_safepref.judge.plugins import HFClassifierJudge

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=2, id2label={0: "safe", 1: "harmful"},
        label2id={"safe": 0, "harmful": 1}))
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    result = evaluate(str(tiny_model_path), benchmark=str(small_bench), limit=6, max_new_tokens=8, batch_size=4,
                      progress=False, keep_generations=True, judge=str(tmp_path / "clf"))
    gens = result["generations"]
    verdicts = HFClassifierJudge(str(tmp_path / "clf")).judge([g["prompt"] for g in gens], [g["response"] for g in gens])
    assert [g["is_harmful"] for g in gens] == [v["is_harmful"] for v in verdicts]
    assert [g["harm_score"] for g in gens] == pytest.approx([v["harm_score"] for v in verdicts], abs=1e-6)
    assert result["judge_kind"] == "hf_sequence_classification" and result["judge"]["harmful_label"] == "harmful"
    assert result["judge"]["path"] == str(tmp_path / "clf") and result["judge_version"].startswith("hf-seqcls:clf+")
    assert result["mean_harm_score_harmful_ci"] is not None


def _run_eval_cli(args, timeout=600):
    import os
    import subprocess

    return subprocess.run([sys.executable, "-m", "llm_safepref.eval", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[1],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def test_eval_cli_prints_intervals(tiny_model_path, small_bench, tmp_path):
    out = tmp_path / "eval.json"
    judge = f"{Path(__file__)}:odd_length_judge"
    proc = _run_eval_cli(["--model", str(tiny_model_path), "--benchmark", str(small_bench), "--limit", "6",
                          "--max_new_tokens", "4", "--batch_size", "4", "--judge", judge, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    for name in ("harmful_compliance_rate", "over_refusal_rate", "benign_refusal_rate", "look_dangerous_refusal_rate",
                 "instruction_following_rate"):
        lo, hi = saved[f"{name}_ci"]
        n = saved["counts"][name]["n"]
        assert f"| {name} | {saved[name]:.3f} [{lo:.3f}, {hi:.3f}] | {n} |" in proc.stdout, name
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["harmful_compliance_rate_ci"] == saved["harmful_compliance_rate_ci"]
    assert summary["interval"] == "wilson" and summary["n_by_category"] == saved["n_by_category"]
    assert proc.stdout.count("Judge correction: none") == 1
    assert saved["judge"]["path"] == judge and saved["judge_kind"] == "callable"
    # Bad judge / audit arguments: one error line, exit status 2, before any generation.
    proc = _run_eval_cli(["--model", str(tiny_model_path), "--benchmark", str(small_bench), "--judge_audit",
                          str(tmp_path / "missing.json")])
    assert proc.returncode == 2 and "error: judge audit" in proc.stderr and "no such file" in proc.stderr
    proc = _run_eval_cli(["--judge", str(tmp_path / "no-model")])
    assert proc.returncode == 2 and "error: --judge" in proc.stderr


def test_recipe_before_after_table_shows_intervals():
    """The recipes' console table: each rate with its interval (core.tables.format_with_ci); old results without."""
    from llm_safepref.recipes.run import RATE_KEYS, before_after_table

    before = {"harmful_compliance_rate": 0.44, "harmful_compliance_rate_ci": [0.347, 0.538],
              "over_refusal_rate": 0.0069, "over_refusal_rate_ci": [0.0012, 0.0379],
              "instruction_following_rate": 0.35, "instruction_following_rate_ci": [0.2637, 0.4475]}
    after = {"harmful_compliance_rate": 0.17, "over_refusal_rate": 0.069, "instruction_following_rate": 0.39}
    table = before_after_table({"base": before, "presa": after, "skipped": None})
    lines = table.splitlines()
    assert lines[0].split() == ["model", *RATE_KEYS]
    assert lines[1].split("  ")[0] == "base" and "0.440 [0.347, 0.538]" in lines[1]
    assert "0.007 [0.001, 0.038]" in lines[1] and "0.350 [0.264, 0.448]" in lines[1]
    assert lines[2].startswith("presa ") and "0.170" in lines[2] and "[" not in lines[2]  # no interval recorded
    assert len(lines) == 4 and "95 % intervals" in lines[3]
    assert before_after_table({"base": None}) == ""
