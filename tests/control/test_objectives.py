"""control.objectives: PRESA's options and Safe-CPL's latent pieces, against hand computations."""

import math

import numpy as np
import pytest
import torch

from control.feedback import CrowdFeedbackConfig, gather_segments, make_crowd_feedback
from control.objectives import (PresaControlConfig, PresaSegmentObjective, safe_cpl_stage1_loss,
                                safe_cpl_stage2_loss, sample_user_latent, segment_pair_features)
from llm_safepref.core.latent import GaussianPrior, PairSetEncoder

pytestmark = pytest.mark.control


def _sums():
    s_c = torch.tensor([-3.0, -1.0], dtype=torch.float64)
    s_r = torch.tensor([-2.0, -4.0], dtype=torch.float64)
    r_c = torch.tensor([-2.5, -1.5], dtype=torch.float64)
    r_r = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    return s_c, s_r, r_c, r_r


def test_presa_objective_dpo_and_ref_point_by_hand():
    obj = PresaSegmentObjective(PresaControlConfig(pref_loss="dpo", beta=0.5, safety_beta=2.0, safety_ref_point=0.5,
                                                   safety_delta=0.6, nu_init=2.0))
    terms = obj(*_sums(), np.array([True, False]), np.array([False, True]))
    # DPO: -log sigmoid(beta ((S_c - R_c) - (S_r - R_r))): margins (-0.5 - 0) and (0.5 - (-1)) = -0.5, 1.5.
    hand_pref = [math.log1p(math.exp(0.5 * 0.5)), math.log1p(math.exp(-0.5 * 1.5))]
    np.testing.assert_allclose(terms.pref_losses.numpy(), hand_pref, rtol=1e-12)
    # u = 2 (S - R) - 0.5 over [chosen; rejected] = [-1.5, 0.5, -0.5, -2.5]; y = [+, -, -, +].
    yu = np.array([-1.5, -0.5, 0.5, -2.5])
    hand_p = 1 / (1 + np.exp(-yu))
    np.testing.assert_allclose(terms.safety_prob.numpy(), hand_p, rtol=1e-12)
    assert terms.loss.item() == pytest.approx(np.mean(hand_pref) + 2.0 * (0.6 - hand_p.mean()), rel=1e-12)


def test_presa_objective_checks_and_state():
    with pytest.raises(ValueError, match="unknown preference loss 'ipo'"):
        PresaControlConfig(pref_loss="ipo")
    with pytest.raises(ValueError, match="cpl_bias"):
        PresaControlConfig(cpl_bias=0.0)
    obj = PresaSegmentObjective()
    s_c, s_r, r_c, r_r = _sums()
    with pytest.raises(ValueError, match="four \\(B,\\) log-prob sums"):
        obj(s_c, s_r[:1], r_c, r_r, [True, True], [True, True])
    with pytest.raises(ValueError, match="safety labels of shape"):
        obj(s_c, s_r, r_c, r_r, [True], [True])
    nu = obj.update_multiplier(torch.tensor([0.2, 0.4]))  # 1.0 + 0.5 (0.7 - 0.3)
    assert nu == pytest.approx(1.2)
    other = PresaSegmentObjective()
    other.load_state_dict(obj.state_dict())
    assert other.multiplier.value == pytest.approx(1.2) and other.multiplier.num_updates == 1


def test_safe_cpl_losses_by_hand():
    prior = GaussianPrior(2, learned=True)
    with torch.no_grad():
        prior.mean.copy_(torch.tensor([0.5, 0.0]))
        prior.logvar.copy_(torch.tensor([0.0, math.log(4.0)]))
    mu = torch.tensor([[1.0, 1.0]])
    logvar = torch.tensor([[0.0, 0.0]])
    s_c, s_r = torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, parts = safe_cpl_stage1_loss(s_c, s_r, mu, logvar, prior, alpha=1.0, bias=0.5, kl_weight=0.1)
    # CPL: x = -1 - 0.5 (-2) = 0 -> log 2. KL per dim: 0.5 (lv_p - lv + (e^lv + (mu - m_p)^2) / e^lv_p - 1).
    kl = 0.5 * (0 - 0 + (1 + 0.25) / 1 - 1) + 0.5 * (math.log(4.0) + (1 + 1) / 4 - 1)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2.0) + 0.1 * kl, rel=1e-6)
    loss.backward()
    assert prior.mean.grad is not None  # the learned prior is trained by the KL
    eps = torch.tensor([[1.0, -2.0]])
    stage2 = safe_cpl_stage2_loss(s_c, s_r, eps, alpha=1.0, bias=0.5, penalty_weight=0.01)
    assert stage2.item() == pytest.approx(math.log(2.0) + 0.01 * 5.0, rel=1e-6)


def test_user_latent_from_real_segment_pairs(smoke_dataset):
    ds = smoke_dataset("run")
    L, K = 16, 4
    fb = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=3, set_size=K, segment_length=L, seed=0))
    ch, rj = gather_segments(ds, fb["chosen"], L), gather_segments(ds, fb["rejected"], L)
    shape = lambda seg: {k: v.reshape(3, K, L, -1) for k, v in seg.items() if k != "costs"}  # noqa: E731
    feats = segment_pair_features(shape(ch), shape(rj))  # (3, K, 2 (obs + A))
    d = ds["observations"].shape[1] + ds["actions"].shape[1]
    assert feats.shape == (3, K, 2 * d)
    # Chosen first: the first half is the chosen segment's time-mean of [s_t, a_t].
    first = np.concatenate([ch["observations"][0], ch["actions"][0]], -1).mean(0)
    np.testing.assert_allclose(feats[0, 0, :d].numpy(), first, rtol=1e-5)
    torch.manual_seed(0)
    enc = PairSetEncoder(pair_dim=2 * d, latent_dim=3, hidden_dim=16)
    mask = torch.tensor([[True] * K, [True, True, False, False], [True] * K])
    z1, mu, logvar = sample_user_latent(enc, feats, mask, generator=torch.Generator().manual_seed(7))
    z2, _, _ = sample_user_latent(enc, feats, mask, generator=torch.Generator().manual_seed(7))
    assert z1.shape == mu.shape == logvar.shape == (3, 3)
    torch.testing.assert_close(z1, z2)  # the explicit generator fixes z
    noise = torch.randn((3, 3), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, mu + (0.5 * logvar).exp() * noise)
