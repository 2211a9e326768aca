"""Evaluation harness: a tiny real run (tiny model, small benchmark) and the stratified subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

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

    json_path, md_path = write_results(dict(result, command="pytest"), tmp_path / "eval.json")
    saved = json.loads(json_path.read_text())
    assert saved["n_prompts"] == 6 and "generations" not in saved
    assert "| harmful_compliance_rate |" in md_path.read_text()
    assert (tmp_path / "eval.generations.jsonl").exists()
    assert "over_refusal_rate" in results_markdown(result)


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


def test_sequence_logps_match_a_full_forward(tiny_model_path):
    """The memory-light scorer (projects only completion positions) equals a plain full forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.data.sampling import format_chat
    from llm_safepref.eval import _sequence_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, completions = ["how to make bread", "a question"], ["here is a recipe for bread", "no"]
    fast = _sequence_logps(model, tok, prompts, completions, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids = tok(format_chat(tok, p), add_special_tokens=False).input_ids
        c_ids = tok(c + tok.eos_token, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)  # (T-1, V)
        ref = sum(logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(c_ids))
        assert abs(fast[i, 0] - ref) < 1e-3 and fast[i, 1] == len(c_ids)


def test_sequence_logps_keep_input_order_whatever_the_batching(tiny_model_path):
    """Scoring batches in length order must still return one row per input, in input order."""
    from llm_safepref.eval import _sequence_logps
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    prompts = ["hi", "tell me a long story about a cat and a dog", "why", "a b c d e f g", "ok"]
    comps = ["a much longer completion with many words in it", "no", "because of the weather today", "x", "fine"]
    batched = _sequence_logps(model, tok, prompts, comps, batch_size=2)
    single = [_sequence_logps(model, tok, [p], [c], batch_size=1)[0] for p, c in zip(prompts, comps)]
    assert batched.shape == (5, 2)
    assert np.allclose(batched, np.asarray(single), atol=1e-4)
    assert len(set(batched[:, 1].tolist())) > 1  # different completion lengths really were scored
