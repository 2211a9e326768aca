"""The reference log-prob cache: bit-identical training, hits that skip the forward, where it is off, shipping."""

from __future__ import annotations

import json

import pytest
import torch

from llm_safepref.methods.base import reference_cache as rc
from llm_safepref.methods.presa.trainer import PresaTrainer
from test_presa_trainer import config, load, lora_config, make_dataset, train_logs

torch.set_num_threads(1)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(folder))
    return folder / "reference_logps"


def _train(tiny_model_path, tmp_path, name, *, cache: bool, peft: bool = True, **overrides):
    model, tok = load(tiny_model_path)
    args = config(tmp_path / name, reference_logps_cache=cache, max_steps=3, **overrides)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config() if peft else None)
    calls = []
    original = trainer._reference_logps

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    trainer._reference_logps = counted
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses = [(e["loss"], e["lagrange/nu"], e["rewards/chosen"]) for e in train_logs(trainer)]
    return trainer, params, losses, len(calls)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hits_skip_the_reference_forward_and_training_is_bit_identical(tiny_model_path, tmp_path, cache_dir):
    _, p_off, l_off, calls_off = _train(tiny_model_path, tmp_path, "off", cache=False)
    t_cold, p_cold, l_cold, calls_cold = _train(tiny_model_path, tmp_path, "cold", cache=True)
    t_warm, p_warm, l_warm, calls_warm = _train(tiny_model_path, tmp_path, "warm", cache=True)

    assert calls_off == calls_cold == 3 and calls_warm == 0
    cold, warm = t_cold.reference_cache_report(), t_warm.reference_cache_report()
    assert (cold["hits"], cold["misses"]) == (0, 3)
    assert (warm["hits"], warm["misses"]) == (3, 0) and warm["hits_by_source"] == {"user-cache": 3}
    assert cold["key"] == warm["key"]
    # Exactly the same numbers with the cache off, cold and warm.
    assert l_off == l_cold == l_warm
    assert _same(p_off, p_cold) and _same(p_off, p_warm)
    files = list((cache_dir / cold["key"]).glob("logps-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3


def test_a_different_batch_or_key_misses(tiny_model_path, tmp_path, cache_dir):
    t1, *_ = _train(tiny_model_path, tmp_path, "a", cache=True)
    # Another seed: other batches, so misses again (nothing stale is served).
    t2, _, _, calls = _train(tiny_model_path, tmp_path, "b", cache=True, seed=1)
    assert calls == 3 and t2.reference_cache_report()["misses"] == 3
    # The key holds the threads: another thread count is another key.
    model, _ = load(tiny_model_path)
    k1 = rc.key_material(tiny_model_path, model, autocast=None, device_type="cpu", threads=1)
    k2 = rc.key_material(tiny_model_path, model, autocast=None, device_type="cpu", threads=2)
    assert rc.ReferenceLogpsCache(k1, user_dir=tmp_path / "x").key != rc.ReferenceLogpsCache(k2, user_dir=tmp_path / "x").key


def test_a_line_cut_short_is_skipped_and_a_foreign_record_ignored(tiny_model_path, tmp_path, cache_dir):
    t1, *_ = _train(tiny_model_path, tmp_path, "a", cache=True)
    key = t1.reference_cache_report()["key"]
    log = next((cache_dir / key).glob("logps-*.jsonl"))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed mid-write
    t2, _, _, calls = _train(tiny_model_path, tmp_path, "b", cache=True)
    assert calls == 1 and t2.reference_cache_report()["hits"] == 2
    record = json.loads((cache_dir / key / "record.json").read_text())
    record["key_material"]["torch_threads"] = 99
    (cache_dir / key / "record.json").write_text(json.dumps(record))
    t3, _, _, calls = _train(tiny_model_path, tmp_path, "c", cache=True)
    assert calls == 3 and t3.reference_cache_report()["hits"] == 0


def test_shipped_entries_are_read(tiny_model_path, tmp_path, cache_dir, monkeypatch):
    t1, p1, l1, _ = _train(tiny_model_path, tmp_path, "a", cache=True)
    key = t1.reference_cache_report()["key"]
    shipped = tmp_path / "shipped"
    rc.ship(key, shipped_dir=shipped)
    assert (shipped / key / "logps-shipped.jsonl").is_file()
    monkeypatch.setattr(rc, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "empty_cache"))
    t2, p2, l2, calls = _train(tiny_model_path, tmp_path, "b", cache=True)
    assert calls == 0 and t2.reference_cache_report()["hits_by_source"] == {"shipped": 3}
    assert l1 == l2 and _same(p1, p2)
    # Shipping another run's batches under the same key keeps the ones shipped before (two recipes, one key).
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "other_cache"))
    t3, *_ = _train(tiny_model_path, tmp_path, "c", cache=True, seed=1)
    assert t3.reference_cache_report()["key"] == key and t3.reference_cache_report()["misses"] > 0
    record_path = shipped / key / "record.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "command": "an earlier run",
                                       "shipped_runs": None}))
    rc.ship(key, shipped_dir=shipped)
    shipped_sigs = [json.loads(line)["sig"] for line in (shipped / key / "logps-shipped.jsonl").read_text().splitlines()]
    assert len(shipped_sigs) == len(set(shipped_sigs)) == 3 + t3.reference_cache_report()["misses"]
    runs = json.loads(record_path.read_text())["shipped_runs"]
    assert [r["command"] for r in runs][0] == "an earlier run" and len(runs) == 2
    rc.ship(key, shipped_dir=shipped, replace=True)
    assert len((shipped / key / "logps-shipped.jsonl").read_text().splitlines()) == t3.reference_cache_report()["misses"]


def test_off_where_it_would_not_be_exact(tiny_model_path, tmp_path, cache_dir):
    full, *_ = _train(tiny_model_path, tmp_path, "full", cache=True, peft=False)
    report = full.reference_cache_report()
    assert report == {"enabled": False, "reason": "the reference is a separate model"} or \
        (report["enabled"] is False and "PEFT" in report["reason"])
    off, *_ = _train(tiny_model_path, tmp_path, "off", cache=False)
    assert off.reference_cache_report() == {"enabled": False, "reason": "reference_logps_cache: false"}
    assert not cache_dir.exists()


def test_the_shipped_entry_matches_this_environment(embedded_model_path, tmp_path):
    """The package's entry is the key the default run (embedded model, 2 threads, these libraries) computes:
    a library or model change that makes it stale fails here (remake it: docs/recipes.md)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)
    record = rc.key_material(embedded_model_path, model, autocast=None, device_type="cpu", threads=2)
    cache = rc.ReferenceLogpsCache(record, user_dir=tmp_path / "empty")
    assert (rc.SHIPPED_DIR / cache.key / "record.json").is_file(), sorted(p.name for p in rc.SHIPPED_DIR.iterdir())
    # The default runs of recipes/presa_lora.py and recipes/safe_cpl_lora.py, 60 batches each (one key).
    assert len(cache.entries) == 120 and set(cache.sources.values()) == {"shipped"}
    commands = [r["command"] for r in json.loads((rc.SHIPPED_DIR / cache.key / "record.json").read_text())["shipped_runs"]]
    assert any("presa_lora.py" in c for c in commands) and any("safe_cpl_lora.py" in c for c in commands)
    assert all(dtype == "float32" and len(values) == 8 for dtype, values in cache.entries.values())
