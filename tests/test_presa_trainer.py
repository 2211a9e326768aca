"""PresaTrainer on the tiny random Llama: training, labels, forwards, limit cases, inputs.

Real TRL trainers, real (tiny) models, small in-memory datasets built here.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_safepref.methods.presa.config import PresaConfig
from llm_safepref.methods.presa.trainer import LAGRANGE_FILE, PresaDataCollator, PresaTrainer

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- data


def make_rows(n: int = 16, *, conversational: bool = False, seed: int = 0) -> list[dict]:
    """Harm-ish prompts; chosen = refusal or help, rejected = compliance; mixed safety labels."""
    rows = []
    for i in range(n):
        prompt = f"How do I do task number {i} at home?"
        chosen = f"I can't help with task {i}, but here is a safer idea." if i % 2 == 0 else f"Sure: step one of task {i}."
        rejected = f"Here is how: first mix the parts for task {i}, then heat them."
        row = dict(prompt=prompt, chosen=chosen, rejected=rejected, chosen_is_safe=True, rejected_is_safe=(i % 4 == 1))
        if conversational:
            row["prompt"] = [{"role": "user", "content": prompt}]
            row["chosen"] = [{"role": "assistant", "content": chosen}]
            row["rejected"] = [{"role": "assistant", "content": rejected}]
        rows.append(row)
    return rows


def make_dataset(n: int = 16, *, conversational: bool = False) -> Dataset:
    return Dataset.from_list(make_rows(n, conversational=conversational))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)


def config(tmp_path, **overrides) -> PresaConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        save_strategy="no",
        seed=0,
        max_length=128,
        dataloader_pin_memory=False,
    )
    kwargs.update(overrides)
    return PresaConfig(**kwargs)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_all_changed(before: dict[str, torch.Tensor], model) -> None:
    after = dict(model.named_parameters())
    assert before, "no trainable parameters"
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]


def assert_nu_follows_constraint(trainer, args: PresaConfig) -> None:
    """nu_t = clip(nu_{t-1} + lr * constraint_t, 0, nu_max) for every logged step."""
    logs = train_logs(trainer)
    assert len(logs) == args.max_steps
    nu = args.nu_init
    for entry in logs:
        assert math.isfinite(entry["loss"])
        expected = min(max(nu + args.nu_lr * entry["lagrange/constraint"], 0.0), args.nu_max)
        assert entry["lagrange/nu"] == pytest.approx(expected, abs=1e-9)
        assert entry["lagrange/constraint"] == pytest.approx(args.safety_delta - entry["lagrange/step_prob_mean"])
        for key in ("safety/prob_safe", "safety/prob_unsafe", "safety/prob_mean", "rewards/margins", "logps/chosen"):
            assert key in entry, key
        nu = entry["lagrange/nu"]
    assert trainer.nu == pytest.approx(nu)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_lora_trains_and_nu_moves(tiny_model_path, tmp_path, conversational):
    model, tok = load(tiny_model_path)
    # delta above the initial p = 0.5: the constraint is violated, so nu must grow.
    args = config(tmp_path, safety_delta=0.8, nu_lr=0.5)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(conversational=conversational),
                           processing_class=tok, peft_config=lora_config())
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert_all_changed(before, trainer.model)
    assert_nu_follows_constraint(trainer, args)
    logs = train_logs(trainer)
    assert logs[0]["lagrange/constraint"] > 0 and logs[-1]["lagrange/nu"] > args.nu_init


def test_full_finetune_trains_and_nu_falls_when_satisfied(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    # delta below p = 0.5: the constraint holds, so nu must shrink (and stop at 0).
    args = config(tmp_path, safety_delta=0.2, nu_init=0.3, nu_lr=1.0, learning_rate=1e-3)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok)
    assert trainer.ref_model is not None  # full fine-tuning: a separate frozen reference
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert_all_changed(before, trainer.model)
    assert_nu_follows_constraint(trainer, args)
    assert [e["lagrange/nu"] for e in train_logs(trainer)][-1] == 0.0


def test_precomputed_reference_and_kto_ref_point(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = config(tmp_path, precompute_ref_log_probs=True, safety_ref_point="kto", pref_loss="dpo", max_steps=2)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    logs = train_logs(trainer)
    assert all("safety/ref_point" in e and e["safety/ref_point"] >= 0 for e in logs)
    assert_nu_follows_constraint(trainer, args)


def test_safety_class_weights_reach_loss_and_nu(tiny_model_path, tmp_path):
    """nu moves with the class-weighted mean safety probability, which the logged per-class means give."""
    model, tok = load(tiny_model_path)
    args = config(tmp_path, safety_safe_weight=0.25, safety_unsafe_weight=1.0, safety_delta=0.8, max_steps=3)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config())
    trainer.train()
    assert_nu_follows_constraint(trainer, args)
    logs = train_logs(trainer)
    for e in logs:
        f = e["safety/frac_safe"]
        assert 0 < f < 1, "the fixture batches must hold both classes"
        expected = (0.25 * f * e["safety/prob_safe"] + (1 - f) * e["safety/prob_unsafe"]) / (0.25 * f + 1 - f)
        assert e["lagrange/step_prob_mean"] == pytest.approx(expected, abs=1e-6)
    # Step 1 starts at policy = reference (every p = 0.5); afterwards the weighted mean differs.
    assert logs[-1]["lagrange/step_prob_mean"] != pytest.approx(logs[-1]["safety/prob_mean"], abs=1e-4)


def test_exclude_safe_rejected_weights(tiny_model_path, tmp_path):
    """Safe rejected responses weigh 0; chosen responses and unsafe rejected ones keep their class weight."""
    model, tok = load(tiny_model_path)
    args = config(tmp_path, safety_exclude_safe_rejected=True, safety_safe_weight=0.5, max_steps=2)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config())
    # [chosen x 3; rejected x 3]: chosen safe, safe, unsafe; rejected unsafe, safe, safe.
    is_safe = torch.tensor([True, True, False, False, True, True])
    w = trainer._safety_weights(is_safe, torch.full((6,), 0.5))
    assert w.tolist() == [0.5, 0.5, 1.0, 1.0, 0.0, 0.0]
    trainer.train()
    assert_nu_follows_constraint(trainer, args)
    plain = PresaTrainer(load(tiny_model_path)[0], args=config(tmp_path), train_dataset=make_dataset(),
                         processing_class=tok, peft_config=lora_config())
    assert plain._safety_weights(is_safe, torch.full((6,), 0.5)) is None


def test_safety_class_weights_are_checked(tmp_path):
    with pytest.raises(ValueError, match="safety_safe_weight"):
        config(tmp_path, safety_safe_weight=0.0, safety_unsafe_weight=0.0)
    with pytest.raises(ValueError, match="safety_safe_weight"):
        config(tmp_path, safety_unsafe_weight=-1.0)


def test_gradient_accumulation_updates_nu_once_per_optimizer_step(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config())
    trainer.train()
    assert trainer.multiplier.num_updates == 2
    assert_nu_follows_constraint(trainer, args)


# ----------------------------------------------------------------------------- forwards and labels


def _forward_recorder(module, calls: list):
    def hook(mod, args, kwargs):
        calls.append(set(kwargs))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_one_policy_and_one_reference_forward_and_no_labels_in_forward(tiny_model_path, tmp_path, use_peft):
    model, tok = load(tiny_model_path)
    args = config(tmp_path, max_steps=3)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config() if use_peft else None)
    policy_calls, ref_calls = [], []
    handles = [_forward_recorder(model, policy_calls)]  # the LlamaForCausalLM inside any PEFT wrapper
    if trainer.ref_model is not None:
        handles.append(_forward_recorder(trainer.ref_model, ref_calls))
    trainer.train()
    for h in handles:
        h.remove()
    calls = policy_calls + ref_calls
    # Per optimiser step: one forward with gradients (policy) and one without (reference).
    assert len(calls) == 2 * args.max_steps
    if not use_peft:
        assert len(policy_calls) == len(ref_calls) == args.max_steps
    allowed = {"input_ids", "attention_mask", "labels", "fused_lm_head", "use_cache"}
    for keys in calls:
        assert keys <= allowed, f"unexpected forward kwargs: {keys - allowed}"
        assert not keys & {"chosen_is_safe", "rejected_is_safe", "completion_mask"}


def test_collator_keeps_labels_as_bool_tensors(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    collator = PresaDataCollator(pad_token_id=tok.pad_token_id or 0)
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "chosen_is_safe": True, "rejected_is_safe": False},
        {"prompt_ids": [1], "chosen_ids": [3, 3], "rejected_ids": [4], "chosen_is_safe": False, "rejected_is_safe": True},
    ]
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 4
    assert batch["chosen_is_safe"].tolist() == [True, False]
    assert batch["rejected_is_safe"].tolist() == [False, True]
    assert batch["chosen_is_safe"].dtype == torch.bool
    with pytest.raises(KeyError, match="chosen_is_safe"):
        collator([{k: v for k, v in examples[0].items() if k != "chosen_is_safe"}])


# ----------------------------------------------------------------------------- limit cases


def _first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize("pref", ["dpo", "cpl"])
def test_presa_without_safety_term_is_dpo(tiny_model_path, tmp_path, pref):
    """nu = 0 and nu_lr = 0 remove the safety term; CPL with alpha = beta, bias 1 on
    reference-adjusted sums is DPO. Same model, same batch -> TRL DPOTrainer's loss."""
    from trl import DPOConfig, DPOTrainer

    ds = make_dataset(8)
    model_p, tok_p = load(tiny_model_path)
    presa = PresaTrainer(
        model_p,
        args=config(tmp_path / "p", nu_init=0.0, nu_lr=0.0, pref_loss=pref, beta=0.3, cpl_alpha=0.3, cpl_bias=1.0),
        train_dataset=ds, processing_class=tok_p,
    )
    model_d, tok_d = load(tiny_model_path)
    dpo = DPOTrainer(
        model_d,
        args=DPOConfig(output_dir=str(tmp_path / "d"), beta=0.3, per_device_train_batch_size=4, max_length=128,
                       report_to="none", bf16=False, gradient_checkpointing=False, seed=0),
        train_dataset=ds, processing_class=tok_d,
    )
    batch = _first_batch(presa)
    dpo_batch = {k: v for k, v in batch.items() if k not in ("chosen_is_safe", "rejected_is_safe")}
    presa.model.train()
    dpo.model.train()
    loss_presa = presa.compute_loss(presa.model, batch)
    loss_dpo = dpo.compute_loss(dpo.model, dpo_batch)
    assert loss_presa.item() == pytest.approx(loss_dpo.item(), abs=1e-6)
    # Same gradients too.
    loss_presa.backward()
    loss_dpo.backward()
    g_p = model_p.model.layers[0].self_attn.q_proj.weight.grad
    g_d = model_d.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(g_p, g_d, rtol=1e-5, atol=1e-7)


def test_safety_term_matches_losses_module(tiny_model_path, tmp_path):
    """The trainer's loss is presa_lagrangian of its own sums (checked from an independent forward)."""
    from llm_safepref.losses import cpl_loss, presa_lagrangian, safety_prob

    model, tok = load(tiny_model_path)
    args = config(tmp_path, nu_init=2.0, safety_beta=0.5, cpl_alpha=0.2, cpl_bias=0.75, safety_ref_point="0.1")
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(8), processing_class=tok)
    batch = _first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
        logps = model(**kw).log_probs.sum(1)
        ref = trainer.ref_model(**kw).log_probs.sum(1)
    c, r = logps.chunk(2)
    rc, rr = ref.chunk(2)
    is_safe = torch.cat([batch["chosen_is_safe"], batch["rejected_is_safe"]])
    expected = presa_lagrangian(
        cpl_loss(c - rc, r - rr, alpha=0.2, bias=0.75),
        safety_prob(logps, ref, is_safe, beta=0.5, ref_point=0.1),
        2.0,
        args.safety_delta,
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("form", ["prob", "log_prob"])
def test_safety_gradient_reaches_the_trainer(tiny_model_path, tmp_path, form):
    """``safety_gradient`` is the core's: the trainer's gradient is presa_lagrangian's with that form."""
    from llm_safepref.losses import cpl_loss, presa_lagrangian, safety_prob

    grads = {}
    for run in ("trainer", "core"):
        torch.manual_seed(0)
        model, tok = load(tiny_model_path)
        args = config(tmp_path, nu_init=2.0, safety_beta=0.5, safety_gradient=form)
        trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(8), processing_class=tok)
        batch = _first_batch(trainer)
        trainer.model.eval()
        weight = model.model.layers[0].self_attn.q_proj.weight
        if run == "trainer":
            loss = trainer.compute_loss(trainer.model, batch)
        else:
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True)
            logps = model(**kw).log_probs.sum(1)
            with torch.no_grad():
                ref = trainer.ref_model(**kw).log_probs.sum(1)
            c, r = logps.chunk(2)
            rc, rr = ref.chunk(2)
            is_safe = torch.cat([batch["chosen_is_safe"], batch["rejected_is_safe"]])
            loss = presa_lagrangian(cpl_loss(c - rc, r - rr, alpha=args.cpl_alpha, bias=args.cpl_bias),
                                    safety_prob(logps, ref, is_safe, beta=0.5), 2.0, args.safety_delta,
                                    safety_gradient=form)
        loss.backward()
        grads[run] = (loss.item(), weight.grad.detach().clone())
    assert grads["trainer"][0] == pytest.approx(grads["core"][0], abs=1e-6)
    torch.testing.assert_close(grads["trainer"][1], grads["core"][1], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_checks(tmp_path):
    args = PresaConfig(output_dir=str(tmp_path), report_to="none")
    assert args.bf16 is False and args.gradient_checkpointing is False and args.logging_steps == 1
    assert args.safety_ref_point_value == 0.0
    assert PresaConfig(output_dir=str(tmp_path), safety_ref_point="kto").safety_ref_point_value == "kto"
    assert PresaConfig(output_dir=str(tmp_path), safety_ref_point=0.25).safety_ref_point_value == 0.25
    bad = [
        (dict(pref_loss="ipo"), "valid names: cpl, dpo"),
        (dict(cpl_bias=0.0), "cpl_bias"),
        (dict(cpl_alpha=-1.0), "cpl_alpha"),
        (dict(safety_delta=1.5), "safety_delta"),
        (dict(nu_init=20.0, nu_max=10.0), "nu_init"),
        (dict(nu_lr=-0.1), "nu_lr"),
        (dict(safety_beta=0.0), "safety_beta"),
        (dict(safety_ref_point="high"), "safety_ref_point"),
        (dict(loss_type=["hinge"]), "pref_loss"),
        (dict(ld_alpha=0.5), "ld_alpha"),
        (dict(safety_gradient="log"), "safety_gradient"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            PresaConfig(output_dir=str(tmp_path), **kwargs)
    for name, f in PresaConfig.__dataclass_fields__.items():
        if name in ("pref_loss", "cpl_alpha", "cpl_bias", "cpl_reference", "safety_beta", "safety_delta",
                    "safety_ref_point", "nu_init", "nu_lr", "nu_max"):
            assert f.metadata.get("help"), name


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: [{k: v for k, v in x.items() if k != "rejected_is_safe"} for x in r], "missing column"),
        (lambda r: [{**x, "chosen_is_safe": 1} for x in r], r"row 0, column 'chosen_is_safe': expected a boolean"),
        (lambda r: [{**x, "chosen_is_safe": "yes"} for x in r], "expected a boolean"),
        (lambda r: [x if i != 3 else {**x, "rejected": "   "} for i, x in enumerate(r)], r"row 3, column 'rejected'"),
        (lambda r: [x if i != 2 else {**x, "chosen": ""} for i, x in enumerate(r)], r"row 2, column 'chosen'"),
    ],
    ids=["missing-column", "int-label", "str-label", "empty-rejected", "empty-chosen"],
)
def test_bad_input_fails_before_training(tiny_model_path, tmp_path, mutate, match):
    model, tok = load(tiny_model_path)
    ds = Dataset.from_list(mutate(make_rows(8)))
    with pytest.raises(ValueError, match=match):
        PresaTrainer(model, args=config(tmp_path), train_dataset=ds, processing_class=tok, peft_config=lora_config())


def test_label_balance_warnings(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    only_safe = Dataset.from_list([{**x, "rejected_is_safe": True, "chosen_is_safe": True} for x in make_rows(8)])
    with pytest.warns(UserWarning, match="no response is labelled unsafe"):
        PresaTrainer(model, args=config(tmp_path), train_dataset=only_safe, processing_class=tok)
    only_unsafe = Dataset.from_list([{**x, "rejected_is_safe": False, "chosen_is_safe": False} for x in make_rows(8)])
    with pytest.warns(UserWarning, match="every response is labelled unsafe"):
        PresaTrainer(model, args=config(tmp_path), train_dataset=only_unsafe, processing_class=tok)


def test_too_long_prompts_are_named(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    rows = make_rows(8)
    rows[5]["prompt"] = "please " * 200
    with pytest.warns(UserWarning, match=r"1 of 8 rows .* max_length=64 .* rows 5"):
        trainer = PresaTrainer(model, args=config(tmp_path, max_length=64), train_dataset=Dataset.from_list(rows),
                               processing_class=tok)
    assert len(trainer.train_dataset) == 7
    all_long = Dataset.from_list([{**x, "prompt": "please " * 200} for x in make_rows(4)])
    with pytest.raises(ValueError, match="leaving nothing to train on"):
        PresaTrainer(model, args=config(tmp_path, max_length=64), train_dataset=all_long, processing_class=tok)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_nu_and_resume_restores_it(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, safety_delta=0.9)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(), processing_class=tok,
                           peft_config=lora_config())
    trainer.train()
    logs = {e["step"]: e for e in train_logs(trainer)}
    for step in (2, 4):
        with open(os.path.join(args.output_dir, f"checkpoint-{step}", LAGRANGE_FILE)) as f:
            state = json.load(f)
        assert state["value"] == pytest.approx(logs[step]["lagrange/nu"])
        assert state["num_updates"] == step and state["global_step"] == step

    # A fresh trainer resumed from checkpoint-2 starts from that nu, not nu_init.
    model2, tok2 = load(tiny_model_path)
    args2 = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, safety_delta=0.9)
    resumed = PresaTrainer(model2, args=args2, train_dataset=make_dataset(), processing_class=tok2,
                           peft_config=lora_config())
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    assert resumed.multiplier.num_updates == 4
    assert resumed.nu == pytest.approx(trainer.nu, abs=1e-9)


@pytest.mark.slow
def test_qlora_4bit_trains(tiny_model_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    args = config(tmp_path, max_steps=2, model_init_kwargs={"dtype": torch.float32})
    trainer = PresaTrainer(
        str(tiny_model_path), args=args, train_dataset=make_dataset(), processing_class=tok,
        peft_config=lora_config(),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert_all_changed(before, trainer.model)
    assert_nu_follows_constraint(trainer, args)


def test_evaluate_logs_eval_metrics_without_moving_nu(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = config(tmp_path, max_steps=1, per_device_eval_batch_size=4)
    trainer = PresaTrainer(model, args=args, train_dataset=make_dataset(8), eval_dataset=make_dataset(8, conversational=False),
                           processing_class=tok, peft_config=lora_config())
    nu = trainer.nu
    metrics = trainer.evaluate()
    assert trainer.nu == nu and trainer.multiplier.num_updates == 0
    for key in ("eval_loss", "eval_safety/prob_mean", "eval_lagrange/nu", "eval_rewards/margins"):
        assert key in metrics, key
    assert metrics["eval_lagrange/nu"] == nu
