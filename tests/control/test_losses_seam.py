"""One loss, two worlds: control segments through llm_safepref.losses."""

import math

import numpy as np
import pytest
import torch

from control.feedback import PresaFeedbackConfig, gather_segments, make_presa_feedback
from control.policies import gaussian_segment_logps, unit_variance_segment_logps
from llm_safepref import losses

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


def test_control_batch_through_cpl_and_safety_prob_equals_hand_computation(smoke_dataset):
    ds = smoke_dataset("halfcheetah_vel")
    L = 64
    fb = make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=6, segment_length=L, seed=3))
    ch, rj = gather_segments(ds, fb["chosen"], L), gather_segments(ds, fb["rejected"], L)
    torch.manual_seed(0)
    policy = torch.nn.Linear(ch["observations"].shape[-1], ch["actions"].shape[-1]).double()
    log_std = torch.full((1, 1, ch["actions"].shape[-1]), -0.5, dtype=torch.float64)

    def S(seg):  # (B,) per-segment log-prob sums
        obs = torch.as_tensor(seg["observations"], dtype=torch.float64)
        act = torch.as_tensor(seg["actions"], dtype=torch.float64)
        return gaussian_segment_logps(policy(obs), log_std, act)

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
