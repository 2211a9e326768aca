"""The shared base of the preference-with-labels trainers (llm_safepref.methods.base).

Metric sums and their one reduction, the Lagrange callback and its exportable state, label
columns of any method, the input-conditioning hook, the MoE auxiliary loss, host syncs per
micro-batch, and resuming nu under default settings. Real TRL trainers on the tiny random
Llama (and a tiny random Mixtral built here); hand-computed expectations where possible.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from transformers.trainer_callback import ExportableState

from llm_safepref.core.losses import dpo_loss
from llm_safepref.core.schema import Metric
from llm_safepref.methods import METHODS, get_method
from llm_safepref.methods.base import (
    LAGRANGE_FILE,
    BatchSums,
    LabelledPreferenceCollator,
    LabelledPreferenceConfig,
    LabelledPreferenceTrainer,
    LagrangeCallback,
)
from llm_safepref.methods.presa import PresaConfig, PresaTrainer

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


def make_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(dict(
            prompt=f"How do I do task number {i} at home?",
            chosen=f"I can't help with task {i}, but here is a safer idea." if i % 2 == 0 else f"Sure: step one of task {i}.",
            rejected=f"Here is how: first mix the parts for task {i}, then heat them.",
            chosen_is_safe=True, rejected_is_safe=(i % 4 == 1), user_id=i % 3,
        ))
    return rows


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)


COMMON = dict(per_device_train_batch_size=4, learning_rate=5e-3, report_to="none", save_strategy="no", seed=0,
              max_length=128, dataloader_pin_memory=False)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


class UserDPOTrainer(LabelledPreferenceTrainer):
    """A minimal method on the base: DPO's loss, an integer per-pair label it must receive."""

    label_columns = ("user_id",)
    seen_user_ids: list

    def compute_pair_loss(self, pair, sums):
        user_id = pair.labels["user_id"]
        assert user_id.dtype == torch.int64 and user_id.shape == pair.chosen_logps.shape
        self.seen_user_ids = getattr(self, "seen_user_ids", []) + user_id.tolist()
        losses = dpo_loss(pair.chosen_logps, pair.rejected_logps, pair.ref_chosen_logps, pair.ref_rejected_logps,
                          beta=self.beta)
        sums.mean(Metric.PREFERENCE_LOSS, losses)
        return losses.mean()


# ----------------------------------------------------------------------------- BatchSums


def test_batch_sums_means_ratios_and_raw_by_hand():
    sums = BatchSums()
    sums.mean("a", torch.tensor([1.0, 2.0, 6.0]))  # 3
    sums.mean("b", torch.tensor([True, False, False, False]))  # 0.25
    sums.ratio("c", torch.tensor(3.0), torch.tensor(4))  # 0.75
    sums.ratio("empty", torch.tensor(0.0), 0.0)  # denominator 0: not logged
    sums.ratio("d", torch.tensor(1.0, dtype=torch.bfloat16), 2.0)  # half precision is summed in float32
    sums.raw("n", torch.tensor(7))
    calls = []

    def reduce_sum(t):
        calls.append(t.clone())
        return t

    metrics, raw = sums.reduce(reduce_sum)
    assert metrics == {"a": 3.0, "b": 0.25, "c": 0.75, "d": 0.5}
    assert raw == {"n": 7.0}
    assert len(calls) == 1 and calls[0].shape == (len(sums),) and calls[0].dtype == torch.float64
    # Two processes holding these same sums: means stay, raw sums double.
    metrics2, raw2 = sums.reduce(lambda t: 2 * t)
    assert metrics2 == metrics and raw2 == {"n": 14.0}
    with pytest.raises(ValueError, match="0-d"):
        sums.ratio("bad", torch.ones(3), 1.0)
    assert BatchSums().reduce(reduce_sum) == ({}, {}) and len(calls) == 1


# ----------------------------------------------------------------------------- LagrangeCallback


def test_lagrange_callback_update_by_hand_and_weightless_step():
    cb = LagrangeCallback(delta=0.7, lr=0.5, init=1.0, nu_max=10.0)
    cb.accumulate(1.0, 2.0)  # micro-batch 1: mean 0.5 over 2
    cb.accumulate(0.4, 2.0)  # micro-batch 2: the step's mean is 1.4 / 4 = 0.35
    cb.on_step_end(None, None, None)
    assert cb.multiplier.value == pytest.approx(1.0 + 0.5 * (0.7 - 0.35))
    assert cb.multiplier.num_updates == 1
    cb.on_step_end(None, None, None)  # nothing accumulated: nu stays
    assert cb.multiplier.num_updates == 1
    assert cb.pop_metrics() == {Metric.NU: [pytest.approx(1.175)], Metric.CONSTRAINT: [pytest.approx(0.35)],
                                Metric.STEP_PROB_MEAN: [pytest.approx(0.35)]}
    assert cb.pop_metrics() == {}


def test_lagrange_callback_state_rebuilds_it_without_a_trainer():
    cb = LagrangeCallback(delta=0.6, lr=0.25, init=2.0, nu_max=5.0)
    for mean in (0.2, 0.9, 0.1):
        cb.accumulate(mean, 1.0)
        cb.on_step_end(None, None, None)
    state = json.loads(json.dumps(cb.state()))  # what trainer_state.json holds
    assert state["attributes"]["multiplier_state"] == cb.multiplier.state_dict()
    # transformers' two ways of rebuilding a callback from its state.
    rebuilt = LagrangeCallback.from_state(state)
    by_hand = LagrangeCallback(**state["args"])
    for k, v in state["attributes"].items():
        setattr(by_hand, k, v)
    for other in (rebuilt, by_hand):
        assert other.multiplier.state_dict() == cb.multiplier.state_dict()
        assert other.multiplier.value == pytest.approx(min(max(2.0 + 0.25 * 0.4 - 0.25 * 0.3 + 0.25 * 0.5, 0), 5))
    assert isinstance(cb, ExportableState)
    # Nothing in it points at a trainer (it would be dead after a rebuild).
    assert not any(isinstance(v, (Trainer, weakref.ref)) for v in vars(cb).values())


# ----------------------------------------------------------------------------- a method on the base


def test_label_columns_kept_collated_and_popped(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = LabelledPreferenceConfig(output_dir=str(tmp_path), max_steps=2, **COMMON)
    assert args.remove_unused_columns  # TRL prunes unknown columns unless the base keeps them
    trainer = UserDPOTrainer(model, args=args, train_dataset=Dataset.from_list(make_rows(8)), processing_class=tok,
                             peft_config=lora_config())
    assert isinstance(trainer.data_collator, LabelledPreferenceCollator)
    assert trainer.multiplier is None and trainer.nu is None and trainer.lagrange_callback is None
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(set(kw)), with_kwargs=True)
    trainer.train()
    handle.remove()
    assert sorted(trainer.seen_user_ids) == sorted(r["user_id"] for r in make_rows(8))
    assert len(calls) == 4 and all("user_id" not in keys for keys in calls)
    assert not os.path.exists(os.path.join(args.output_dir, LAGRANGE_FILE))  # no multiplier, no file
    trainer.save_model()
    assert not os.path.exists(os.path.join(args.output_dir, LAGRANGE_FILE))


def test_method_loss_on_the_base_is_trl_dpo(tiny_model_path, tmp_path):
    """DPO's loss written on the base's sums = TRL DPOTrainer's loss and gradients (full fine-tuning)."""
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list(make_rows(8))
    model_u, tok_u = load(tiny_model_path)
    ours = UserDPOTrainer(model_u, args=LabelledPreferenceConfig(output_dir=str(tmp_path / "u"), beta=0.3, **COMMON),
                          train_dataset=ds, processing_class=tok_u)
    model_d, tok_d = load(tiny_model_path)
    dpo = DPOTrainer(model_d, args=DPOConfig(output_dir=str(tmp_path / "d"), beta=0.3, per_device_train_batch_size=4,
                                             max_length=128, report_to="none", bf16=False,
                                             gradient_checkpointing=False, seed=0),
                     train_dataset=ds.remove_columns(["chosen_is_safe", "rejected_is_safe", "user_id"]),
                     processing_class=tok_d)
    batch = first_batch(ours)
    ours.model.train()
    dpo.model.train()
    loss = ours.compute_loss(ours.model, batch)
    loss_dpo = dpo.compute_loss(dpo.model, {k: v for k, v in batch.items() if k != "user_id"})
    assert loss.item() == pytest.approx(loss_dpo.item(), abs=1e-6)
    loss.backward()
    loss_dpo.backward()
    torch.testing.assert_close(model_u.model.layers[0].mlp.up_proj.weight.grad,
                               model_d.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-7)
    # The DPO metrics TRL logs are logged too, with TRL's values.
    for key in ("rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "logits/chosen"):
        assert ours._metrics["train"][key][0] == pytest.approx(dpo._metrics["train"][key][0], rel=1e-5, abs=1e-6), key


def test_base_refuses_misuse(tiny_model_path, tmp_path):
    model, tok = load(tiny_model_path)
    args = LabelledPreferenceConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(TypeError, match="compute_pair_loss"):
        LabelledPreferenceTrainer(model, args=args, train_dataset=Dataset.from_list(make_rows(4)), processing_class=tok)
    no_user = Dataset.from_list([{k: v for k, v in r.items() if k != "user_id"} for r in make_rows(4)])
    with pytest.raises(ValueError, match=r"train dataset: missing label column\(s\) \['user_id'\]"):
        UserDPOTrainer(model, args=args, train_dataset=no_user, processing_class=tok)
    with pytest.raises(TypeError, match="needs a PresaConfig, got LabelledPreferenceConfig"):
        PresaTrainer(model, args=args, train_dataset=Dataset.from_list(make_rows(4)), processing_class=tok)
    with pytest.warns(UserWarning, match=r"no constraint, so \['nu_lr'\] are unused"):
        UserDPOTrainer(model, args=LabelledPreferenceConfig(output_dir=str(tmp_path), nu_lr=0.1, **COMMON),
                       train_dataset=Dataset.from_list(make_rows(4)), processing_class=tok)


def test_collator_label_types_and_missing_labels():
    collator = LabelledPreferenceCollator(pad_token_id=0, label_columns=("flag", "user_id", "score", "context"))
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "flag": True, "user_id": 3, "score": 0.5,
         "context": [1.0, 2.0]},
        {"prompt_ids": [1], "chosen_ids": [3, 3], "rejected_ids": [4], "flag": False, "user_id": 1, "score": 2.0,
         "context": [3.0, 4.0]},
    ]
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 4
    assert batch["flag"].dtype == torch.bool and batch["flag"].tolist() == [True, False]
    assert batch["user_id"].dtype == torch.int64 and batch["user_id"].tolist() == [3, 1]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0.5, 2.0]
    assert batch["context"].shape == (2, 2)
    with pytest.raises(KeyError, match=r"'user_id' in examples \[1\]"):
        collator([examples[0], {k: v for k, v in examples[1].items() if k != "user_id"}])
    with pytest.raises(TypeError, match="label column 'context'"):
        collator([examples[0], {**examples[1], "context": [1.0]}])


def test_compatibility_paths_are_the_new_objects():
    import llm_safepref
    from llm_safepref import presa_config, presa_trainer
    from llm_safepref.methods.presa import trainer as new_trainer

    assert presa_trainer.PresaTrainer is llm_safepref.PresaTrainer is PresaTrainer
    assert presa_config.PresaConfig is presa_trainer.PresaConfig is llm_safepref.PresaConfig is PresaConfig
    assert presa_trainer.PresaDataCollator is new_trainer.PresaDataCollator
    assert presa_trainer.LAGRANGE_FILE == LAGRANGE_FILE == "lagrange.json"
    assert issubclass(PresaTrainer, LabelledPreferenceTrainer) and issubclass(PresaConfig, LabelledPreferenceConfig)


def test_methods_registry():
    assert get_method("presa") == (PresaConfig, PresaTrainer)
    assert set(METHODS) == {"presa", "safe_cpl"}
    with pytest.raises(ValueError, match="valid names: presa"):
        get_method("nope")


def test_config_help_and_shared_checks(tmp_path):
    for name, f in LabelledPreferenceConfig.__dataclass_fields__.items():
        if name in ("bf16", "gradient_checkpointing", "logging_steps", "nu_init", "nu_lr", "nu_max"):
            assert f.metadata.get("help"), name
    for name, f in PresaConfig.__dataclass_fields__.items():  # every field PRESA adds
        if name not in LabelledPreferenceConfig.__dataclass_fields__:
            assert f.metadata.get("help"), name
    bad = [(dict(loss_weights=[1.0]), "loss_weights"), (dict(label_smoothing=0.1), "label_smoothing"),
           (dict(use_weighting=True), "use_weighting"), (dict(f_divergence_type="js_divergence"), "f_divergence"),
           (dict(nu_max=-1.0, nu_init=0.0), "nu_max"), (dict(beta=0.0), "beta")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            LabelledPreferenceConfig(output_dir=str(tmp_path), **kwargs)
    with pytest.raises(ValueError, match="this trainer uses the method's own loss options"):
        LabelledPreferenceConfig(output_dir=str(tmp_path), loss_type=["ipo"])


# ----------------------------------------------------------------------------- conditioning hook


class SoftPromptDPOTrainer(UserDPOTrainer):
    """Prepends P fixed vectors through inputs_embeds (what Safe-CPL's soft prompt does)."""

    def __init__(self, *a, n_virtual: int = 0, **kw):
        super().__init__(*a, **kw)
        hidden = self.model.config.hidden_size
        self.soft_prompt = torch.randn(n_virtual, hidden, generator=torch.Generator().manual_seed(0))
        self.hook_calls: list[tuple[bool, bool]] = []

    def condition_model_inputs(self, model, model_kwargs, labels, *, reference):
        self.hook_calls.append((reference, torch.is_grad_enabled()))
        embeds = self.accelerator.unwrap_model(model).get_input_embeddings()(model_kwargs.pop("input_ids"))
        n, p = embeds.size(0), self.soft_prompt.size(0)
        model_kwargs["inputs_embeds"] = torch.cat([self.soft_prompt.expand(n, p, -1).to(embeds), embeds], dim=1)
        mask, token_labels = model_kwargs["attention_mask"], model_kwargs["labels"]
        model_kwargs["attention_mask"] = torch.cat([mask.new_ones(n, p), mask], dim=1)
        model_kwargs["labels"] = torch.cat([token_labels.new_full((n, p), -100), token_labels], dim=1)
        return model_kwargs


def test_conditioning_hook_reaches_both_forwards(tiny_model_path, tmp_path):
    ds = Dataset.from_list(make_rows(4))
    model, tok = load(tiny_model_path)
    args = LabelledPreferenceConfig(output_dir=str(tmp_path), **COMMON)
    plain = UserDPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    batch = first_batch(plain)
    plain.model.eval()
    with torch.no_grad():
        _, out_plain = plain.compute_loss(plain.model, batch, return_outputs=True)

    # P = 0 through inputs_embeds: the very same sums as through input_ids.
    zero = SoftPromptDPOTrainer(load(tiny_model_path)[0], args=args, train_dataset=ds, processing_class=tok)
    zero.model.eval()
    _, out_zero = zero.compute_loss(zero.model, batch, return_outputs=True)
    torch.testing.assert_close(out_zero["logps"], out_plain["logps"])
    torch.testing.assert_close(out_zero["ref_logps"], out_plain["ref_logps"])
    assert zero.hook_calls == [(False, True), (True, False)]  # policy with gradients, then reference without

    # P = 3: the prepended positions change the sums, and are never counted themselves.
    soft = SoftPromptDPOTrainer(load(tiny_model_path)[0], args=args, train_dataset=ds, processing_class=tok,
                                n_virtual=3)
    soft.model.eval()
    with torch.no_grad():
        _, out_soft = soft.compute_loss(soft.model, batch, return_outputs=True)
        kwargs = soft.condition_model_inputs(soft.model, soft._forward_kwargs(soft._split_batch(batch)[0]), {},
                                             reference=False)
        manual = soft.model(**kwargs, fused_lm_head=True).log_probs
    seq_len = batch["input_ids"].size(1) - 1
    torch.testing.assert_close(out_soft["logps"], manual[:, -seq_len:].sum(1))
    torch.testing.assert_close(out_soft["logps"], manual.sum(1))  # the prepended positions contribute 0
    assert not torch.allclose(out_soft["logps"], out_plain["logps"])


# ----------------------------------------------------------------------------- MoE auxiliary loss


@pytest.fixture(scope="module")
def tiny_moe_path(tiny_model_path, tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, router_aux_loss_coef=0.05, output_router_logits=False,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-moe")
    MixtralForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_moe_aux_loss_added_as_trl_does(tiny_moe_path, tmp_path):
    """PRESA without its safety term on a MoE model = TRL DPO's loss, router aux loss included."""
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list(make_rows(8))
    model_p, tok_p = load(tiny_moe_path)
    presa = PresaTrainer(model_p, args=PresaConfig(output_dir=str(tmp_path / "p"), nu_init=0.0, nu_lr=0.0,
                                                   pref_loss="dpo", beta=0.3, **COMMON),
                         train_dataset=ds, processing_class=tok_p)
    assert presa.aux_loss_enabled and presa.router_aux_loss_coef == 0.05
    model_d, tok_d = load(tiny_moe_path)
    dpo = DPOTrainer(model_d, args=DPOConfig(output_dir=str(tmp_path / "d"), beta=0.3, per_device_train_batch_size=4,
                                             max_length=128, report_to="none", bf16=False,
                                             gradient_checkpointing=False, seed=0),
                     train_dataset=ds.remove_columns(["chosen_is_safe", "rejected_is_safe", "user_id"]),
                     processing_class=tok_d)
    policy_calls, ref_calls = [], []
    handles = [model_p.register_forward_pre_hook(lambda m, a, kw: policy_calls.append(set(kw)), with_kwargs=True),
               presa.ref_model.register_forward_pre_hook(lambda m, a, kw: ref_calls.append(set(kw)), with_kwargs=True)]
    batch = first_batch(presa)
    presa.model.train()
    dpo.model.train()
    loss = presa.compute_loss(presa.model, batch)
    loss_dpo = dpo.compute_loss(dpo.model, {k: v for k, v in batch.items() if k not in ("chosen_is_safe", "rejected_is_safe")})
    for h in handles:
        h.remove()
    assert loss.item() == pytest.approx(loss_dpo.item(), abs=1e-6)
    aux = presa._metrics["train"]["aux_loss"][0]
    assert aux > 0 and aux == pytest.approx(dpo._metrics["train"]["aux_loss"][0], rel=1e-6)
    pref = presa._metrics["train"][Metric.PREFERENCE_LOSS][0]
    assert loss.item() == pytest.approx(pref + 0.05 * aux, abs=1e-6)  # nu = 0: L_pref + coef * aux
    assert "output_router_logits" in policy_calls[0] and "output_router_logits" not in ref_calls[0]
    loss.backward()
    loss_dpo.backward()
    router_p = model_p.model.layers[0].mlp.gate.weight.grad
    router_d = model_d.model.layers[0].mlp.gate.weight.grad
    assert router_p is not None and router_p.abs().sum() > 0  # the aux loss trains the router
    torch.testing.assert_close(router_p, router_d, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- one sync per micro-batch


def test_one_reduction_and_one_host_sync_per_micro_batch(tiny_model_path, tmp_path, monkeypatch):
    model, tok = load(tiny_model_path)
    args = PresaConfig(output_dir=str(tmp_path), max_steps=2, gradient_accumulation_steps=2,
                       **{**COMMON, "per_device_train_batch_size": 2})
    trainer = PresaTrainer(model, args=args, train_dataset=Dataset.from_list(make_rows(8)), processing_class=tok,
                           peft_config=lora_config())
    counts = {"reduce": 0, "gather": 0, "tolist": 0, "item": 0, "micro_batches": 0, "reduce_outside": 0}
    inside = [False]
    acc = trainer.accelerator

    def counting(name, fn, outside=None):
        def wrapper(*a, **k):
            if inside[0]:
                counts[name] += 1
            elif outside is not None:
                counts[outside] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(acc, "reduce", counting("reduce", acc.reduce, outside="reduce_outside"))
    monkeypatch.setattr(acc, "gather", counting("gather", acc.gather))
    monkeypatch.setattr(acc, "gather_for_metrics", counting("gather", acc.gather_for_metrics))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    inner = trainer._compute_loss

    def compute_loss(*a, **k):
        counts["micro_batches"] += 1
        inside[0] = True
        try:
            return inner(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(trainer, "_compute_loss", compute_loss)
    trainer.train()
    # Per micro-batch: one reduce (every metric and nu's sums), one .tolist(), no gather, no .item();
    # nu's per-step update adds no collective of its own.
    assert counts == {"reduce": 4, "gather": 0, "tolist": 4, "item": 0, "micro_batches": 4, "reduce_outside": 0}
    assert trainer.multiplier.num_updates == 2


# ----------------------------------------------------------------------------- resume under default settings


def _presa(path, tmp_path, **overrides):
    model, tok = load(path)
    args = PresaConfig(output_dir=str(tmp_path / "out"), **{**COMMON, "max_steps": 4, "save_strategy": "steps",
                                                            "save_steps": 2, "safety_delta": 0.9, **overrides})
    return PresaTrainer(model, args=args, train_dataset=Dataset.from_list(make_rows()), processing_class=tok,
                        peft_config=lora_config())


@pytest.fixture(scope="module")
def straight(tiny_model_path, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("straight")
    trainer = _presa(tiny_model_path, tmp)
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e}
    return {"nu": trainer.nu, "logs": logs, "checkpoint": os.path.join(trainer.args.output_dir, "checkpoint-2")}


def _copy_checkpoint(straight, tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(straight["checkpoint"], ckpt)
    return ckpt


def test_checkpoint_callback_state_holds_nu(straight):
    with open(os.path.join(straight["checkpoint"], "trainer_state.json")) as f:
        stored = json.load(f)["stateful_callbacks"]["LagrangeCallback"]
    state = stored["attributes"]["multiplier_state"]
    assert state["value"] == pytest.approx(straight["logs"][2][Metric.NU]) and state["num_updates"] == 2
    assert stored["args"] == {"delta": 0.9, "lr": 0.5, "init": 1.0, "nu_max": 10.0, "sense": "ge"}


def test_resume_default_args_restores_nu_from_callback_state(tiny_model_path, tmp_path, straight):
    """restore_callback_states_from_checkpoint left at its default (False), lagrange.json deleted:
    nu comes back from trainer_state.json alone and ends where the uninterrupted run ends."""
    ckpt = _copy_checkpoint(straight, tmp_path)
    os.remove(ckpt / LAGRANGE_FILE)
    resumed = _presa(tiny_model_path, tmp_path)
    assert resumed.args.restore_callback_states_from_checkpoint is False
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.multiplier.num_updates == 4
    assert resumed.nu == pytest.approx(straight["nu"], abs=1e-9)
    logs = {e["step"]: e for e in resumed.state.log_history if "loss" in e and "train_runtime" not in e}
    assert logs[3][Metric.NU] == pytest.approx(straight["logs"][3][Metric.NU], abs=1e-9)
    assert len([cb for cb in resumed.callback_handler.callbacks if isinstance(cb, LagrangeCallback)]) == 1


def test_resume_with_callback_restore_on_keeps_current_config(tiny_model_path, tmp_path, straight):
    """With restore_callback_states_from_checkpoint=True transformers rebuilds the callback from the
    checkpoint's args; nu still comes back, and the run's own nu_lr (changed here) is the one used."""
    ckpt = _copy_checkpoint(straight, tmp_path)
    resumed = _presa(tiny_model_path, tmp_path, restore_callback_states_from_checkpoint=True, nu_lr=0.25)
    resumed.train(resume_from_checkpoint=str(ckpt))
    callbacks = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, LagrangeCallback)]
    assert len(callbacks) == 1 and callbacks[0].multiplier.lr == 0.25
    logs = {e["step"]: e for e in resumed.state.log_history if "loss" in e and "train_runtime" not in e}
    nu2 = straight["logs"][2][Metric.NU]
    assert logs[3][Metric.NU] == pytest.approx(min(max(nu2 + 0.25 * logs[3][Metric.CONSTRAINT], 0), 10), abs=1e-9)
    assert resumed.multiplier.num_updates == 4


def test_resume_from_a_checkpoint_without_callback_state_reads_lagrange_json(tiny_model_path, tmp_path, straight):
    """A checkpoint written before the callback state existed: nu from lagrange.json, and the
    resumed run's checkpoints hold the callback state again."""
    ckpt = _copy_checkpoint(straight, tmp_path)
    state_path = ckpt / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["stateful_callbacks"]["LagrangeCallback"]
    state_path.write_text(json.dumps(state))
    resumed = _presa(tiny_model_path, tmp_path)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.nu == pytest.approx(straight["nu"], abs=1e-9) and resumed.multiplier.num_updates == 4
    with open(os.path.join(resumed.args.output_dir, "checkpoint-4", "trainer_state.json")) as f:
        saved = json.load(f)["stateful_callbacks"]["LagrangeCallback"]["attributes"]["multiplier_state"]
    assert saved["value"] == pytest.approx(straight["nu"], abs=1e-9)
    with open(os.path.join(resumed.args.output_dir, "checkpoint-4", LAGRANGE_FILE)) as f:
        assert json.load(f)["value"] == pytest.approx(straight["nu"], abs=1e-9)


# ----------------------------------------------------------------------------- the embedded model


@pytest.mark.embedded
@pytest.mark.slow
def test_presa_without_safety_term_is_trl_dpo_on_the_embedded_model(embedded_model_path, tmp_path):
    """SmolLM2-135M-Instruct, conversational rows through its chat template, LoRA with the
    adapter-off reference: PRESA with nu = 0 gives TRL DPO's loss, sums and adapter gradients."""
    from trl import DPOConfig, DPOTrainer

    rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in make_rows(4)]
    ds = Dataset.from_list(rows)
    common = {**COMMON, "max_length": 96}
    model_p, tok_p = load(embedded_model_path)
    presa = PresaTrainer(model_p, args=PresaConfig(output_dir=str(tmp_path / "p"), nu_init=0.0, nu_lr=0.0,
                                                   pref_loss="dpo", beta=0.1, **common),
                         train_dataset=ds, processing_class=tok_p, peft_config=lora_config())
    model_d, tok_d = load(embedded_model_path)
    dpo = DPOTrainer(model_d, args=DPOConfig(output_dir=str(tmp_path / "d"), beta=0.1, per_device_train_batch_size=4,
                                             max_length=96, report_to="none", bf16=False,
                                             gradient_checkpointing=False, seed=0),
                     train_dataset=ds.remove_columns(["chosen_is_safe", "rejected_is_safe", "user_id"]),
                     processing_class=tok_d, peft_config=lora_config())
    batch = first_batch(presa)
    presa.model.train()
    dpo.model.train()
    loss = presa.compute_loss(presa.model, batch)
    loss_dpo = dpo.compute_loss(dpo.model, {k: v for k, v in batch.items() if k not in ("chosen_is_safe", "rejected_is_safe")})
    assert loss.item() == pytest.approx(loss_dpo.item(), abs=1e-6)
    for key in ("logps/chosen", "logps/rejected", "entropy"):
        assert presa._metrics["train"][key][0] == pytest.approx(dpo._metrics["train"][key][0], rel=1e-5), key
    loss.backward()
    loss_dpo.backward()
    grads_p = {n: p.grad for n, p in presa.model.named_parameters() if p.requires_grad and "lora_B" in n}
    grads_d = {n: p.grad for n, p in dpo.model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert grads_p and grads_p.keys() == grads_d.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_d[name], rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_p.values())
