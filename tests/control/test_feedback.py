import numpy as np
import pytest

from control.data import DataError
from control.feedback import (CrowdFeedbackConfig, PresaFeedbackConfig, dataset_statistics, default_crowd_config,
                              gather_segments, make_crowd_feedback, make_presa_feedback, segment_rows,
                              segment_sums, validate_feedback)

pytestmark = pytest.mark.control


def test_crowd_feedback_labels_follow_each_users_goal_minus_cost(smoke_dataset):
    ds = smoke_dataset("ant_vel")
    cfg = CrowdFeedbackConfig(n_query_sets=40, set_size=16, segment_length=64, seed=1)
    fb = make_crowd_feedback(ds, cfg)
    n = 40 * 16
    assert fb["chosen"].shape == fb["rejected"].shape == fb["user_id"].shape == (n,)
    # One labeller per query set.
    for q in range(40):
        assert len(np.unique(fb["user_id"][fb["query_set_id"] == q])) == 1
    # Recompute every score by hand from the dataset.
    for i in range(0, n, 37):
        u = fb["user_id"][i]
        rows_c, rows_r = segment_rows(fb["chosen"][i:i + 1], 64)[0], segment_rows(fb["rejected"][i:i + 1], 64)[0]
        sc = ds["rewards"][rows_c, u].sum() - 10 * ds["costs"][rows_c].sum()
        sr = ds["rewards"][rows_r, u].sum() - 10 * ds["costs"][rows_r].sum()
        assert sc >= sr - 1e-4
        assert ds["episode_ids"][rows_c[0]] == ds["episode_ids"][rows_c[-1]]
    seg = gather_segments(ds, fb["chosen"][:3], 64)
    assert seg["observations"].shape == (3, 64, ds["observations"].shape[1])


def test_crowd_imbalance_noise_and_boltzmann(smoke_dataset):
    ds = smoke_dataset("halfcheetah_vel")
    fb = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=50, set_size=4, user_weights=(1.0, 0.0)))
    assert (fb["user_id"] == 0).all()
    fb = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=400, set_size=4, user_weights=(3.0, 1.0)))
    assert 0.65 < (fb["user_id"] == 0).mean() < 0.85
    clean = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=300, set_size=4, seed=2))
    noisy = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=300, set_size=4, seed=2, label_noise=0.3))
    score = lambda fb, s: fb[s + "_return"] - 10 * fb[s + "_cost"]  # noqa: E731
    assert (score(clean, "chosen") >= score(clean, "rejected")).all()
    wrong = (score(noisy, "chosen") < score(noisy, "rejected")).mean()
    assert 0.2 < wrong < 0.4
    boltz = make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=300, set_size=4, seed=2, beta=1e-6))
    assert 0.35 < (score(boltz, "chosen") < score(boltz, "rejected")).mean() < 0.65  # near-random
    with pytest.raises(ValueError, match="user_weights must be 2"):
        make_crowd_feedback(ds, CrowdFeedbackConfig(n_query_sets=2, user_weights=(1.0, 1.0, 1.0)))
    assert default_crowd_config("reach").set_size == 32 and default_crowd_config("run").segment_length == 64


def test_presa_feedback_preferences_and_safety_labels(smoke_dataset):
    ds = smoke_dataset("swimmer_vel")
    fb = make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=200, segment_length=64, goal_id=2, cost_threshold=3.0))
    assert (fb["chosen_return"] >= fb["rejected_return"]).all()  # reward only, cost ignored
    np.testing.assert_allclose(fb["chosen_return"], segment_sums(ds["rewards"][:, 2], fb["chosen"], 64), rtol=1e-6)
    np.testing.assert_array_equal(fb["chosen_is_safe"], segment_sums(ds["costs"], fb["chosen"], 64) <= 3.0)
    np.testing.assert_array_equal(fb["rejected_is_safe"], fb["rejected_cost"] <= 3.0)
    assert (fb["user_id"] == 2).all()
    with pytest.raises(ValueError, match="unknown user/goal id 4"):
        make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=5, goal_id=4))


def test_bad_feedback_gets_a_clear_error(smoke_dataset):
    ds = smoke_dataset("run")
    with pytest.raises(DataError, match="no episode is at least segment_length=500"):
        make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=5, segment_length=500))
    fb = make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=10, segment_length=64))
    short = dict(fb)
    last_episode_start = ds.episode_bounds()[-1, 1] - 10
    short["chosen"] = fb["chosen"].copy()
    short["chosen"][3] = last_episode_start  # only 10 steps left in the episode
    with pytest.raises(DataError, match=r"'chosen' row 3: segment starting at dataset row \d+ is shorter than"):
        validate_feedback(short, ds)
    mism = dict(fb)
    mism["rejected"] = fb["rejected"][:-1]
    with pytest.raises(DataError, match="column 'rejected' has 9 rows but 'chosen' has 10"):
        validate_feedback(mism, ds)
    unknown = dict(fb)
    unknown["user_id"] = fb["user_id"].copy()
    unknown["user_id"][1] = 5
    with pytest.raises(DataError, match="'user_id' row 1 has goal id 5, which does not exist"):
        validate_feedback(unknown, ds)


def test_dataset_statistics(smoke_dataset):
    ds = smoke_dataset("circle")
    st = dataset_statistics(ds, segment_length=64)
    assert st["n_transitions"] == ds.n
    assert 0.0 <= st["unsafe_segment_fraction"] <= 1.0
    assert set(st["per_goal"]) == {"0", "1"}
    assert st["per_goal"]["0"]["return_own_episodes"]["n"] >= 1
    assert st["command"] == "pytest"
    # SAC's lambdas 0 and 10 (the unmodified smoke data): the names the results files use.
    assert st["penalties"] == [0.0, 10.0]
    assert {"return_own_episodes_penalty0", "return_own_episodes_penalty10"} <= set(st["per_goal"]["0"])


def test_dataset_statistics_bins_every_lambda_including_cost_seeking(smoke_dataset):
    from control.data import Dataset

    ds = smoke_dataset("circle")
    arrays = {k: v.copy() for k, v in ds.arrays.items()}
    b = ds.episode_bounds()
    goal = ds["goal_ids"][b[:, 0]]
    # Two goal-0 episodes become lambda = -10 episodes (the gait search's cost-seeking policy).
    picked = np.flatnonzero(goal == 0)[:2]
    assert len(picked) == 2
    for e in picked:
        arrays["penalties"][b[e, 0]:b[e, 1]] = -10.0
    st = dataset_statistics(Dataset(arrays, dict(ds.meta)), segment_length=64)
    assert st["penalties"] == [-10.0, 0.0, 10.0]
    g0 = st["per_goal"]["0"]
    hand = [float(ds["rewards"][b[e, 0]:b[e, 1], 0].astype(np.float64).sum()) for e in picked]
    assert g0["return_own_episodes_penalty-10"]["n"] == 2
    assert g0["return_own_episodes_penalty-10"]["mean"] == pytest.approx(np.mean(hand), rel=1e-9)
    hand_cost = [float(ds["costs"][b[e, 0]:b[e, 1]].sum()) for e in picked]
    assert g0["cost_own_episodes_penalty-10"]["mean"] == pytest.approx(np.mean(hand_cost), abs=1e-9)
    assert st["per_goal"]["1"]["return_own_episodes_penalty-10"] == {"n": 0}
    # Every goal-directed episode of a goal is in exactly one lambda bin.
    for u, entry in st["per_goal"].items():
        for kind in ("return", "cost"):
            binned = sum(entry[f"{kind}_own_episodes_penalty{lam:g}"]["n"] for lam in st["penalties"])
            assert binned == entry[f"{kind}_own_episodes"]["n"] == int((goal == int(u)).sum()), (u, kind)
