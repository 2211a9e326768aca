import numpy as np
import pytest

from control.evaluation import compose_hierarchical, evaluate_policy, normalized_cost, normalized_reward, reward_reference

pytestmark = pytest.mark.control


def test_normalisation_formulas():
    assert normalized_reward(5.0, 0.0, 10.0) == pytest.approx(0.5)
    assert normalized_reward(-2.0, -4.0, 0.0) == pytest.approx(0.5)
    assert normalized_cost(30.0, 20.0) == pytest.approx(1.5)
    assert normalized_cost(0.0, 0.0) == pytest.approx(1.0)  # (C + 1) / (kappa + 1)
    with pytest.raises(ValueError):
        normalized_reward(1.0, 2.0, 2.0)


def _linear_policy(obs_dim, act_dim, seed):
    W = np.random.default_rng(seed).normal(size=(act_dim, obs_dim)) * 0.3
    return lambda obs: np.tanh(obs @ W.T)


def test_evaluation_is_seeded_and_independent_of_batching():
    pol = _linear_policy(17, 6, 0)
    a = evaluate_policy(pol, "halfcheetah_vel", [1.0, 0.0], episodes=3, seed=4, n_envs=3, max_episode_steps=50)
    b = evaluate_policy(pol, "halfcheetah_vel", [1.0, 0.0], episodes=3, seed=4, n_envs=2, max_episode_steps=50)
    c = evaluate_policy(pol, "halfcheetah_vel", [1.0, 0.0], episodes=3, seed=5, n_envs=3, max_episode_steps=50)
    a2 = evaluate_policy(pol, "halfcheetah_vel", [1.0, 0.0], episodes=3, seed=4, n_envs=3, max_episode_steps=50)
    np.testing.assert_array_equal(a.returns, a2.returns)
    np.testing.assert_array_equal(a.costs, a2.costs)
    # Other batching: same episodes; only BLAS rounding of the batched policy may differ.
    np.testing.assert_allclose(a.returns, b.returns, rtol=1e-6)
    assert not np.array_equal(a.returns, c.returns)
    assert (a.lengths == 50).all()
    assert a.normalized_cost == pytest.approx(a.costs.mean() / 20.0)


def test_evaluation_with_reference_and_hierarchical_policy(smoke_dataset):
    ds = smoke_dataset("run")
    r_min, r_max = reward_reference(ds, [5.0])
    assert r_max > r_min
    # High level picks z per state; the frozen low level maps (obs, z) to a push along x.
    high = lambda obs: np.ones((len(obs), 1))  # noqa: E731
    low = lambda obs, z: np.concatenate([z, np.zeros_like(z)], 1)  # noqa: E731
    res = evaluate_policy(compose_hierarchical(high, low), "run", [5.0], episodes=2, seed=0,
                          reward_ref=(r_min, r_max), max_episode_steps=40)
    assert res.costs.min() > 0  # full throttle breaks the speed limit
    d = res.as_dict()
    assert d["eval/normalized_reward"] == pytest.approx(float(((res.returns - r_min) / (r_max - r_min)).mean()))
    with pytest.raises(ValueError, match="policy returned actions of shape"):
        evaluate_policy(lambda o: np.zeros((len(o), 3)), "run", [1.0], episodes=1, max_episode_steps=5)
    with pytest.raises(ValueError, match="high-level policy returned z"):
        evaluate_policy(compose_hierarchical(lambda o: np.ones(len(o)), low), "run", [1.0], episodes=1,
                        max_episode_steps=5)
