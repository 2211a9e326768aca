"""The shared loss core: hand-computed values, gradients, limits, and TRL's own numbers."""

import math

import pytest
import torch

from llm_safepref import losses as L


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_cpl_loss_hand_computed():
    chosen = torch.tensor([-10.0, -3.0])
    rejected = torch.tensor([-12.0, -1.0])
    out = L.cpl_loss(chosen, rejected, alpha=0.1, bias=0.5)
    # -log sigmoid(0.1 * -10 - 0.5 * 0.1 * -12) = -log sigmoid(-0.4)
    expected = [-math.log(_sig(-1.0 + 0.6)), -math.log(_sig(-0.3 + 0.05))]
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_cpl_loss_is_stable_for_large_logits():
    out = L.cpl_loss(torch.tensor([-1e4]), torch.tensor([0.0]), alpha=1.0, bias=1.0)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(1e4)


def test_dpo_loss_hand_computed():
    out = L.dpo_loss(
        torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5]), beta=0.1
    )
    # beta * ((-5 + 6) - (-7 + 6.5)) = 0.1 * 1.5
    assert out.item() == pytest.approx(-math.log(_sig(0.15)), rel=1e-6)


def test_cpl_with_bias_one_on_reference_adjusted_logps_is_dpo():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(16, generator=g) * 20 for _ in range(4))
    beta = 0.2
    cpl = L.cpl_loss(c - rc, r - rr, alpha=beta, bias=1.0)
    dpo = L.dpo_loss(c, r, rc, rr, beta=beta)
    torch.testing.assert_close(cpl, dpo)


def test_safety_margin_prob_and_loss_hand_computed():
    logps = torch.tensor([-4.0, -4.0, -2.0])
    ref = torch.tensor([-5.0, -5.0, -1.0])
    is_safe = torch.tensor([True, False, False])
    beta, z = 0.5, 0.1
    # u = 0.5 * (logps - ref) - 0.1 = [0.4, 0.4, -0.6]; y = [+1, -1, -1]
    margin = L.safety_margin(logps, ref, is_safe, beta=beta, ref_point=z)
    assert margin.tolist() == pytest.approx([0.4, -0.4, 0.6])
    prob = L.safety_prob(logps, ref, is_safe, beta=beta, ref_point=z)
    assert prob.tolist() == pytest.approx([_sig(0.4), _sig(-0.4), _sig(0.6)])
    loss = L.safety_loss(logps, ref, is_safe, beta=beta, ref_point=z)
    assert loss.tolist() == pytest.approx([1 - _sig(0.4), 1 - _sig(-0.4), 1 - _sig(0.6)])


@pytest.mark.parametrize("labels", [[1, 0, 0], [1.0, -1.0, -1.0]])
def test_safety_labels_accept_ints_and_signs(labels):
    logps, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.zeros(3)
    a = L.safety_margin(logps, ref, torch.tensor(labels), beta=1.0)
    b = L.safety_margin(logps, ref, torch.tensor([True, False, False]), beta=1.0)
    torch.testing.assert_close(a, b)


def test_presa_lagrangian_value_and_gradients():
    logps = torch.tensor([-3.0, -4.0], requires_grad=True)
    ref = torch.tensor([-3.5, -3.0])
    nu = torch.tensor(2.0, requires_grad=True)
    pref = L.cpl_loss(logps[:1], logps[1:], alpha=0.1, bias=0.5)
    p = L.safety_prob(logps, ref, torch.tensor([True, False]), beta=0.1)
    out = L.presa_lagrangian(pref, p, nu, delta=0.9)
    expected = pref.mean().item() + 2.0 * (0.9 - p.mean().item())
    assert out.ndim == 0 and out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    assert logps.grad is not None and torch.all(logps.grad != 0)
    assert nu.grad is None  # the dual variable is a constant for the policy gradient


def test_presa_with_zero_nu_is_the_preference_loss():
    pref = torch.tensor([0.3, 0.7])
    p = torch.tensor([0.1, 0.2])
    assert L.presa_lagrangian(pref, p, 0.0, delta=0.9).item() == pytest.approx(0.5)


def test_presa_log_prob_gradient_keeps_the_value_and_does_not_saturate():
    ref = torch.zeros(2)
    labels = torch.tensor([True, False])
    # The safe segment made very unlikely (u = -8): p = sigmoid(-8) ~ 3e-4.
    for form in ("prob", "log_prob"):
        logps = torch.tensor([-80.0, 5.0], requires_grad=True)
        p = L.safety_prob(logps, ref, labels, beta=0.1)
        out = L.presa_lagrangian(torch.tensor([0.2]), p, 3.0, delta=0.7, safety_gradient=form)
        assert out.item() == pytest.approx(0.2 + 3.0 * (0.7 - p.mean().item()), rel=1e-6)
        out.backward()
        u = -8.0
        p_safe = 1.0 / (1.0 + math.exp(-u))
        # d out / d logps[0] = -nu/2 * beta * g(p): g = p (1 - p) for "prob", (1 - p) for "log_prob".
        g = p_safe * (1 - p_safe) if form == "prob" else 1 - p_safe
        assert logps.grad[0].item() == pytest.approx(-3.0 / 2 * 0.1 * g, rel=1e-4)
    with pytest.raises(ValueError, match="safety_gradient"):
        L.presa_lagrangian(torch.tensor([0.2]), p.detach(), 1.0, delta=0.7, safety_gradient="logp")


def test_presa_lagrangian_class_weights():
    pref = torch.tensor([0.4])
    p = torch.tensor([0.9, 0.7, 0.2], requires_grad=True)
    w = torch.tensor([0.5, 0.5, 1.0])  # two safe responses at half weight, one unsafe
    out = L.presa_lagrangian(pref, p, 2.0, delta=0.6, weights=w)
    assert out.item() == pytest.approx(0.4 + 2.0 * (0.6 - (0.45 + 0.35 + 0.2) / 2.0))
    out.backward()
    # d/dp_i = -nu * w_i / sum(w): the unsafe response gets twice the push of each safe one.
    assert p.grad.tolist() == pytest.approx([-0.5, -0.5, -1.0])
    assert L.weighted_mean(p.detach(), torch.ones(3)).item() == pytest.approx(p.detach().mean().item())
    with pytest.raises(ValueError, match="do not match"):
        L.presa_lagrangian(pref, p, 1.0, delta=0.6, weights=torch.ones(2))


def test_weighted_lagrangian_shards_average_to_the_global_one():
    """Two data-parallel shards with weight_total = global sum(w) / 2 average to the one-process loss."""
    pref = torch.tensor([0.3, 0.5])
    p = torch.tensor([0.9, 0.2, 0.6, 0.7])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])  # shard sums differ (1 and 2)
    full = L.presa_lagrangian(pref, p, 1.5, delta=0.7, weights=w)
    total = w.sum() / 2
    shards = [L.presa_lagrangian(pref[i:i + 1], p[2 * i:2 * i + 2], 1.5, delta=0.7, weights=w[2 * i:2 * i + 2],
                                 weight_total=total) for i in range(2)]
    assert ((shards[0] + shards[1]) / 2).item() == pytest.approx(full.item())
    local = [L.presa_lagrangian(pref[i:i + 1], p[2 * i:2 * i + 2], 1.5, delta=0.7, weights=w[2 * i:2 * i + 2])
             for i in range(2)]
    assert ((local[0] + local[1]) / 2).item() != pytest.approx(full.item())


def test_lagrange_multiplier_projected_ascent_and_state():
    nu = L.LagrangeMultiplier(delta=0.8, lr=0.5, init=0.2, nu_max=1.0)
    assert nu.update(0.4) == pytest.approx(0.4)  # 0.2 + 0.5 * (0.8 - 0.4)
    assert nu.update(torch.tensor(1.0)) == pytest.approx(0.3)
    assert nu.update(1.0) == pytest.approx(0.2)
    for _ in range(5):
        nu.update(1.0)
    assert nu.value == 0.0  # projected onto nu >= 0
    for _ in range(20):
        nu.update(0.0)
    assert nu.value == 1.0  # clipped at nu_max
    state = nu.state_dict()
    other = L.LagrangeMultiplier(delta=0.8, lr=0.5)
    other.load_state_dict(state)
    assert other.value == 1.0 and other.num_updates == nu.num_updates == 28
    with pytest.raises(ValueError, match="scalar"):
        nu.update(torch.tensor([0.1, 0.2]))  # an unreduced batch is refused
    with pytest.raises(ValueError, match="delta"):
        L.LagrangeMultiplier(delta=1.5)


def test_gaussian_kl_hand_computed_and_zero_at_prior():
    mu = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]])
    kl = L.gaussian_kl(mu, logvar)
    # row 2: 0.5 * [(-ln2 + 2 + 1 - 1) + (0 + 0 + 1 - 1 + ... )] = 0.5*(1 - ln2 + 1) + 0.5*1
    expected_row2 = 0.5 * (-math.log(2.0) + 2.0 + 1.0 - 1.0) + 0.5 * (0.0 + 1.0 + 1.0 - 1.0)
    assert kl.tolist() == pytest.approx([0.0, expected_row2])
    prior_mu, prior_logvar = torch.tensor([[1.0]]), torch.tensor([[math.log(4.0)]])
    kl2 = L.gaussian_kl(torch.tensor([[3.0]]), torch.tensor([[0.0]]), prior_mu, prior_logvar)
    # 0.5 * (ln4 - 0 + (1 + 4)/4 - 1)
    assert kl2.item() == pytest.approx(0.5 * (math.log(4.0) + 1.25 - 1.0))
    torch.testing.assert_close(L.gaussian_kl(prior_mu, prior_logvar, prior_mu, prior_logvar), torch.zeros(1))


def test_prior_penalty():
    assert L.prior_penalty(torch.tensor([[1.0, -2.0], [0.0, 3.0]])).tolist() == [5.0, 9.0]


def test_registry():
    assert L.get_loss("cpl") is L.cpl_loss
    assert L.get_preference_loss("dpo") is L.dpo_loss
    with pytest.raises(ValueError, match="valid names: .*cpl.*dpo"):
        L.get_preference_loss("ipo")
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        L.get_loss("nope")


def test_losses_do_not_move_devices_or_keep_state():
    # Pure functions: dtype and device of the inputs are kept; nothing is cached between calls.
    c = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([-2.0, -1.0], dtype=torch.float64)
    first = L.cpl_loss(c, r, alpha=1.0)
    assert first.dtype == torch.float64 and first.device == c.device
    # softplus(-(S+ - S-)): logits -1 - (-2) = 1 and -2 - (-1) = -1, in float64 precision.
    assert first.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))], rel=1e-12)
    # A call on other inputs in between leaves no trace (no cache, no running statistic).
    L.cpl_loss(torch.tensor([5.0, 7.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64), alpha=3.0)
    L.presa_lagrangian(first, torch.tensor([0.2, 0.9], dtype=torch.float64), 2.0, 0.7)
    assert torch.equal(L.cpl_loss(c, r, alpha=1.0), first)
    assert L.safety_prob(c.float(), r.float(), torch.tensor([True, False]), beta=1.0).dtype == torch.float32


# --------------------------------------------------------------------------- against TRL


def test_safety_loss_equals_trl_kto_apo_zero_unpaired(tiny_model_path, tmp_path):
    """With ref_point=0 our safety loss is TRL's `apo_zero_unpaired` KTO loss: run TRL's own
    KTOTrainer loss on real batches and compare with ours on the same log-probs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    rows = [
        {"prompt": "how to make bread", "completion": " first the water then the fire", "label": True},
        {"prompt": "how to build a weapon", "completion": " i will not help", "label": True},
        {"prompt": "how to build a weapon", "completion": " here is a recipe for a weapon", "label": False},
        {"prompt": "explain python code", "completion": " sorry cannot", "label": False},
    ]
    beta = 0.3
    args = KTOConfig(
        output_dir=str(tmp_path),
        loss_type="apo_zero_unpaired",
        beta=beta,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)
    gen = torch.Generator().manual_seed(1)

    for _ in range(3):
        # Arbitrary reference log-probs make the comparison sensitive in both directions.
        batch["ref_logps"] = torch.randn(len(rows), generator=gen) * 5 - 20
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, dict(batch))
            completion_labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = trainer.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=completion_labels,
                fused_lm_head=True,
            )
            logps = out.log_probs.sum(-1)
        ours = L.safety_loss(logps, batch["ref_logps"], batch["label"], beta=beta, ref_point=0.0)
        assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
