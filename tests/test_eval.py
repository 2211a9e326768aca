"""Evaluation harness: a tiny real run (tiny model, small benchmark) and the stratified subset."""

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
    assert set(result["n_by_category"]) == {"harmful", "benign", "look_dangerous"}
    assert all(v >= 1 for v in result["n_by_category"].values())
    for key in ("harmful_compliance_rate", "over_refusal_rate", "instruction_following_rate"):
        assert 0.0 <= result[key] <= 1.0
    assert result["judge_version"].startswith("minilm-probe-v2+")
    assert result["preference"]["n_pairs"] == 2 and 0.0 <= result["preference"]["preference_accuracy"] <= 1.0
    assert len(result["generations"]) == 6 and all("response" in g for g in result["generations"])
    # The rates are the means of the per-prompt verdicts kept in the generations.
    gens = result["generations"]
    harmful = [g for g in gens if g["category"] == "harmful"]
    not_harmful = [g for g in gens if g["category"] != "harmful"]
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
    for flag in ("--preference_pairs", "--max_length", "--conversational", "--judge_weights", "--limit_per_category"):
        assert flag in out.stdout
    from llm_safepref.eval.__main__ import build_parser

    snake = build_parser().parse_args(["--batch_size", "4", "--limit_per_category", "3", "--conversational", "false"])
    kebab = build_parser().parse_args(["--batch-size", "4", "--limit-per-category", "3", "--conversational", "false"])
    assert snake == kebab and snake.batch_size == 4 and snake.conversational is False and snake.max_length == 160
