"""One loss, two worlds: control segments through llm_safepref.core, as the token-level trainer calls it.

Control path: segments -> ``control.policies.policy_segment_logps`` (B,) sums ->
``control.objectives.PresaSegmentObjective``. Token path: the same (B,) sums through
``llm_safepref.core.losses`` and a ``LagrangeMultiplier`` exactly as ``PresaTrainer`` calls them.
"""

import math

import numpy as np
import pytest
import torch

from control.feedback import PresaFeedbackConfig, gather_segments, make_presa_feedback
from control.objectives import PresaControlConfig, PresaSegmentObjective
from control.policies import gaussian_segment_logps, policy_segment_logps, unit_variance_segment_logps
from llm_safepref.core import losses
from llm_safepref.core.lagrange import LagrangeMultiplier

pytestmark = pytest.mark.control


def test_gaussian_segment_logps_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, actions = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    log_std = torch.randn(1, 1, 2, generator=g) * 0.3
    ref = torch.distributions.Normal(mean, log_std.exp().expand_as(mean)).log_prob(actions).sum((1, 2))
    torch.testing.assert_close(gaussian_segment_logps(mean, log_std, actions), ref)
    torch.testing.assert_close(unit_variance_segment_logps(mean, actions), -((mean - actions) ** 2).sum((1, 2)))
    with pytest.raises(ValueError):
        gaussian_segment_logps(mean[:, :, :1], log_std, actions)
    # policy_segment_logps: a mean head with a given log_std, a (mean, log_std) head, no std (CPL's score).
    seg = {"observations": mean.numpy(), "actions": actions.numpy()}
    torch.testing.assert_close(policy_segment_logps(lambda o: o, seg, log_std=log_std), ref)
    torch.testing.assert_close(policy_segment_logps(lambda o: (o, log_std), seg), ref)
    torch.testing.assert_close(policy_segment_logps(lambda o: o, seg), -((mean - actions) ** 2).sum((1, 2)))
    with pytest.raises(ValueError, match=r"observations \(B, L, obs_dim\) and actions"):
        policy_segment_logps(lambda o: o, {"observations": mean.numpy()[:, :4], "actions": actions.numpy()})


def _segments_and_policies(smoke_dataset, task, n_pairs, L, seed):
    ds = smoke_dataset(task)
    fb = make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=n_pairs, segment_length=L, seed=seed))
    ch, rj = gather_segments(ds, fb["chosen"], L), gather_segments(ds, fb["rejected"], L)
    torch.manual_seed(0)
    policy = torch.nn.Linear(ch["observations"].shape[-1], ch["actions"].shape[-1]).double()
    reference = torch.nn.Linear(ch["observations"].shape[-1], ch["actions"].shape[-1]).double().requires_grad_(False)
    log_std = torch.full((1, 1, ch["actions"].shape[-1]), -0.5, dtype=torch.float64)
    return fb, ch, rj, policy, reference, log_std


def test_control_batch_through_cpl_and_safety_prob_equals_hand_computation(smoke_dataset):
    L = 64
    fb, ch, rj, policy, _, log_std = _segments_and_policies(smoke_dataset, "halfcheetah_vel", 6, L, 3)

    def S(seg):  # (B,) per-segment log-prob sums, control's policy code
        return policy_segment_logps(policy, seg, log_std=log_std, dtype=torch.float64)

    s_c, s_r = S(ch), S(rj)
    alpha, bias = 0.1, 0.5
    got = losses.cpl_loss(s_c, s_r, alpha=alpha, bias=bias)
    # Hand computation, element by element, in plain Python floats.
    W, b = policy.weight.detach().numpy(), policy.bias.detach().numpy()
    sd = math.exp(-0.5)

    def hand_S(seg, i):
        tot = 0.0
        for t in range(L):
            mu = W @ seg["observations"][i, t].astype(np.float64) + b
            for k in range(len(mu)):
                z = (float(seg["actions"][i, t, k]) - mu[k]) / sd
                tot += -0.5 * z * z - math.log(sd) - 0.5 * math.log(2 * math.pi)
        return tot

    for i in range(6):
        hc, hr = hand_S(ch, i), hand_S(rj, i)
        x = alpha * hc - bias * alpha * hr
        assert got[i].item() == pytest.approx(math.log1p(math.exp(-x)) if x > -30 else -x, rel=1e-9, abs=1e-9)
        # PRESA's safety probability with a reference policy: sigmoid(y * beta * (S - S_ref)).
    ref_c = s_c.detach() - 1.0
    p = losses.safety_prob(s_c, ref_c, torch.as_tensor(fb["chosen_is_safe"]), beta=0.2)
    y = np.where(fb["chosen_is_safe"], 1.0, -1.0)
    np.testing.assert_allclose(p.detach().numpy(), 1 / (1 + np.exp(-y * 0.2 * 1.0)), rtol=1e-12)
    # Gradients reach the policy parameters through the segment sums.
    got.mean().backward()
    assert policy.weight.grad is not None and policy.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cpl_reference", [True, False])
def test_control_path_and_token_path_give_the_same_presa_loss(smoke_dataset, cpl_reference):
    # Run's smoke segments carry safe and unsafe labels (y = +1 and -1 both reach the loss).
    fb, ch, rj, policy, reference, log_std = _segments_and_policies(smoke_dataset, "run", 8, 32, 5)
    labels = np.r_[fb["chosen_is_safe"], fb["rejected_is_safe"]]
    assert labels.any() and not labels.all()
    cfg = PresaControlConfig(cpl_alpha=0.05, cpl_bias=0.5, cpl_reference=cpl_reference, safety_beta=0.1,
                             safety_delta=0.7, nu_init=1.5, nu_lr=0.5, nu_max=10.0)

    def S(net, seg):
        return policy_segment_logps(net, seg, log_std=log_std, dtype=torch.float64)

    s_c, s_r, r_c, r_r = S(policy, ch), S(policy, rj), S(reference, ch), S(reference, rj)

    # Control path.
    objective = PresaSegmentObjective(cfg)
    terms = objective(s_c, s_r, r_c, r_r, fb["chosen_is_safe"], fb["rejected_is_safe"])

    # Token path: PresaTrainer's calls on the same (B,) sums (safety_ref_point unset = 0).
    multiplier = LagrangeMultiplier(delta=cfg.safety_delta, lr=cfg.nu_lr, init=cfg.nu_init, nu_max=cfg.nu_max)
    a_c, a_r = (s_c - r_c, s_r - r_r) if cpl_reference else (s_c, s_r)
    pref = losses.cpl_loss(a_c, a_r, alpha=cfg.cpl_alpha, bias=cfg.cpl_bias)
    logps, ref_logps = torch.cat([s_c, s_r]), torch.cat([r_c, r_r])
    is_safe = torch.cat([torch.as_tensor(fb["chosen_is_safe"]), torch.as_tensor(fb["rejected_is_safe"])])
    p = losses.safety_prob(logps, ref_logps, is_safe, beta=cfg.safety_beta, ref_point=0.0)
    token_loss = losses.presa_lagrangian(pref, p, multiplier.value, multiplier.delta)

    assert torch.equal(terms.loss, token_loss)
    assert torch.equal(terms.pref_losses, pref) and torch.equal(terms.safety_prob, p)
    g_control = torch.autograd.grad(terms.loss, list(policy.parameters()), retain_graph=True)
    g_token = torch.autograd.grad(token_loss, list(policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_control, g_token))
    assert g_control[0].abs().sum() > 0

    # The number itself, by hand from the sums (float64 numpy).
    sc, sr, rc, rr = (x.detach().numpy() for x in (s_c, s_r, r_c, r_r))
    ac, ar = (sc - rc, sr - rr) if cpl_reference else (sc, sr)
    x = cfg.cpl_alpha * ac - cfg.cpl_bias * cfg.cpl_alpha * ar
    hand_pref = np.logaddexp(0.0, -x)  # -log sigmoid(x)
    y = np.where(np.r_[fb["chosen_is_safe"], fb["rejected_is_safe"]], 1.0, -1.0)
    hand_p = 1.0 / (1.0 + np.exp(-y * cfg.safety_beta * (np.r_[sc, sr] - np.r_[rc, rr])))
    hand_loss = hand_pref.mean() + 1.5 * (0.7 - hand_p.mean())
    assert terms.loss.item() == pytest.approx(hand_loss, rel=1e-10)

    # The multiplier moves the same way: nu <- clip(nu + lr (delta - mean p), 0, nu_max).
    nu_control = objective.update_multiplier(terms.safety_prob)
    nu_token = multiplier.update(p.detach().sum().item() / p.numel())  # PresaTrainer: sum / count
    assert nu_control == pytest.approx(nu_token, rel=1e-15)
    assert nu_control == pytest.approx(min(max(1.5 + 0.5 * (0.7 - hand_p.mean()), 0.0), 10.0), rel=1e-12)
    assert objective.state_dict()["multiplier"] == multiplier.state_dict()
