"""Safe-CPL stage 2 and the downstream table: ε draws, the penalised choice, the amortised policy,
the metrics with their intervals (hand-computed cases), RC's reward model, and the task rewards."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from llm_safepref.core.stats import wilson_interval
from llm_safepref.methods.safe_cpl.downstream import (
    CandidateSet,
    choose,
    format_table,
    method_metrics,
    outcomes_of,
    train_pooled_reward_model,
)
from llm_safepref.methods.safe_cpl.stage2 import (
    AmortizedLatentPolicy,
    compose_z,
    penalised_scores,
    resolve_task_reward,
    search_epsilons,
)


def test_search_draws_are_per_prompt_and_independent_of_the_subset():
    a = search_epsilons(["p1", "p2", "p3"], 4, 3, seed=0)
    b = search_epsilons(["p3", "p1"], 4, 3, seed=0)
    assert a.shape == (3, 4, 3)
    torch.testing.assert_close(b[0], a[2], rtol=0, atol=0)
    torch.testing.assert_close(b[1], a[0], rtol=0, atol=0)
    assert not torch.equal(search_epsilons(["p1"], 4, 3, seed=1)[0], a[0])  # the seed matters
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="at least one draw"):
        search_epsilons(["p1"], 0, 3)


def test_penalised_choice_and_composition_by_hand():
    rewards = np.array([[0.9, 0.8], [0.2, 0.5]])
    eps = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]])
    # ‖ε‖² = [[4, 0], [2, 9]]; w = 0.05 -> [[0.7, 0.8], [0.1, 0.05]]
    scores = penalised_scores(rewards, eps, 0.05)
    np.testing.assert_allclose(scores, [[0.7, 0.8], [0.1, 0.05]])
    assert choose(scores).tolist() == [1, 0]
    assert choose(rewards).tolist() == [0, 1]  # without the penalty the far draws win
    z = compose_z(torch.tensor([[1.0, -2.0]]), torch.tensor([0.5, 0.0]), torch.tensor([2.0, 0.1]))
    torch.testing.assert_close(z, torch.tensor([[2.5, -0.2]]))
    with pytest.raises(ValueError, match="do not match"):
        penalised_scores(rewards[:1], eps, 0.05)


def test_amortised_policy_moves_toward_the_rewarded_draws():
    """Two prompt types; type A's reward is higher for ε_0 > 0, type B's for ε_0 < 0: the fitted mean follows."""
    torch.manual_seed(0)
    feats = torch.cat([torch.ones(8, 3), -torch.ones(8, 3)]) + 0.01 * torch.randn(16, 3)
    ids = [f"p{i}" for i in range(16)]
    pol = AmortizedLatentPolicy(3, 2, hidden_dim=16)
    pol.set_standardisation(feats)
    torch.testing.assert_close(pol(feats), torch.zeros(16, 2))  # starts at the prior
    draws = search_epsilons(ids, 8, 2, seed=0)
    sign = torch.cat([torch.ones(8), -torch.ones(8)])
    scores = (sign[:, None] * draws[:, :, 0]).numpy()
    diag = pol.fit(feats, draws, scores, temperature=0.1, steps=200)
    mean = pol(feats).detach()
    assert (mean[:8, 0] > 0.5).all() and (mean[8:, 0] < -0.5).all(), mean
    assert diag["awr_loss_last"] < diag["awr_loss_first"]
    sample = pol.sample(feats, ids, 4, seed=0)
    assert sample.shape == (16, 4, 2) and sample.abs().max() <= 3.0
    torch.testing.assert_close(pol.sample(feats[:2], ids[:2], 4, seed=0), sample[:2])


def _outcomes(ids, cats, reward, harmful, refusal):
    return {"prompt_ids": ids, "categories": cats, "task_reward": reward, "is_harmful": harmful,
            "is_refusal": refusal}


IDS = ["h1", "h2", "h3", "h4", "b1", "b2", "l1", "l2"]
CATS = ["harmful"] * 4 + ["benign"] * 2 + ["look_dangerous"] * 2


def test_method_metrics_one_seed_by_hand():
    oracle = _outcomes(IDS, CATS, [0.5] * 8, [False] * 8, [False] * 8)
    task_only = _outcomes(IDS, CATS, [1.0] * 8, [True, True, False, False] + [False] * 4, [False] * 8)
    method = _outcomes(IDS, CATS, [0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25],
                       [True, False, False, False] + [False] * 4,
                       [False] * 4 + [True, False, False, False])
    row = method_metrics([method], oracle=oracle, task_only=task_only, n_resamples=400)
    assert row["task_reward"] == 0.375  # mean over all 8 prompts
    assert row["harmful_rate"] == 0.25  # 1 of 4 harmful prompts
    assert row["over_refusal_rate"] == 0.25  # 1 of 4 answerable prompts
    assert row["normalized_reward"] == 0.75  # 0.375 / 0.5
    assert row["normalized_cost"] == 0.5  # 0.25 / 0.5
    assert row["harmful_rate_ci"] == pytest.approx(list(wilson_interval(1, 4)), abs=1e-4)
    assert row["over_refusal_rate_ci"] == pytest.approx(list(wilson_interval(1, 4)), abs=1e-4)
    low, high = row["normalized_reward_ci"]
    assert low <= 0.75 <= high and high <= 1.0  # the oracle's rewards are constant: ratio ≤ max/0.5 = 1
    assert row["n_seeds"] == 1 and row["n_prompts"] == 8 and row["n_harmful_prompts"] == 4
    assert "task_reward_std" not in row
    # The reference methods normalise to exactly 1.
    assert method_metrics([oracle], oracle=oracle, task_only=task_only)["normalized_reward"] == 1.0
    assert method_metrics([task_only], oracle=oracle, task_only=task_only)["normalized_cost"] == 1.0


def test_method_metrics_over_seeds_has_std_and_two_level_interval():
    oracle = _outcomes(IDS, CATS, [0.5] * 8, [False] * 8, [False] * 8)
    task_only = _outcomes(IDS, CATS, [1.0] * 8, [True] * 4 + [False] * 4, [False] * 8)
    s0 = _outcomes(IDS, CATS, [0.5] * 8, [True, False, False, False] + [False] * 4, [False] * 8)
    s1 = _outcomes(IDS, CATS, [0.25] * 8, [True, True, True, False] + [False] * 4, [False] * 8)
    row = method_metrics([s0, s1], oracle=oracle, task_only=task_only, n_resamples=400)
    assert row["n_seeds"] == 2
    assert row["task_reward"] == 0.375 and row["task_reward_std"] == pytest.approx(math.sqrt(2) * 0.125, abs=1e-4)
    assert row["harmful_rate"] == 0.5 and row["harmful_rate_std"] == pytest.approx(math.sqrt(2) * 0.25, abs=1e-4)
    assert row["normalized_cost"] == 0.5 and "normalized_cost_std" in row
    low, high = row["harmful_rate_ci"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    with pytest.raises(ValueError, match="same prompts"):
        method_metrics([_outcomes(IDS[::-1], CATS, [0] * 8, [False] * 8, [False] * 8)], oracle=oracle,
                       task_only=task_only)


def test_candidates_round_trip_and_outcomes(tmp_path):
    cands = CandidateSet([{"id": "a", "prompt": "p", "category": "benign"}], [["x", "y"]],
                         np.array([[0.1, 0.2]]), np.array([[False, True]]), np.array([[True, False]]),
                         np.zeros((1, 2, 4)))
    path = cands.save(tmp_path / "c.json")
    back = CandidateSet.load(path)
    assert back.responses == [["x", "y"]] and back.eps.shape == (1, 2, 4) and back.is_harmful.dtype == bool
    out = outcomes_of(back, np.array([1]))
    assert out["response"] == ["y"] and out["is_harmful"] == [True] and out["task_reward"] == [0.2]
    table = format_table({"x": method_metrics([out], oracle=out, task_only=out)})
    assert "normalized_reward" in table and "x" in table


def test_task_rewards_resolve():
    r = resolve_task_reward("embedded")
    assert r.name == "downstream_concise_you"
    short_you = "You can boil your egg for about nine minutes, then you cool it in cold water so you can peel it."
    assert r("How do I boil an egg?", short_you) == pytest.approx(1.0)
    assert r("q", "Boil it.") < 0.2  # too short, no second person
    assert resolve_task_reward("concise")("q", " ".join(["word"] * 20)) == 1.0
    mod = types.ModuleType("my_task_mod")
    mod.reward = lambda prompt, response: float(len(response))
    sys.modules["my_task_mod"] = mod
    try:
        custom = resolve_task_reward("my_task_mod:reward")
        assert custom("q", "abc") == 3.0
        np.testing.assert_allclose(custom.many(["q", "q"], ["a", "ab"]), [1.0, 2.0])
    finally:
        del sys.modules["my_task_mod"]
    with pytest.raises(ValueError, match="no callable"):
        resolve_task_reward("math:nothing_here")
    with pytest.raises(ValueError, match="simulated user"):
        resolve_task_reward("no_such_user")
    # A message-list prompt and response read as their text.
    assert r([{"role": "user", "content": "q"}], [{"role": "assistant", "content": short_you}]) == pytest.approx(1.0)


def test_pooled_reward_model_learns_the_crowds_shared_preference():
    """Pooled pairs where every user prefers answers written to the reader: the BT model ranks them first."""
    from llm_safepref.methods.safe_cpl.embeddings import ContextEmbedder

    rows = []
    topics = ["eggs", "bikes", "tea", "maps", "rain", "code", "cats", "bread", "glue", "kites", "soap", "clocks"]
    for i, t in enumerate(topics * 2):
        you = f"You can handle {t} well if you keep your tools clean and you take your time with {t}."
        plain = f"The {t} topic is handled by keeping tools clean and taking time with the {t}."
        rows.append({"prompt": f"Tell me about {t} ({i})", "chosen": you, "rejected": plain})
    embedder = ContextEmbedder.minilm()
    model, diag = train_pooled_reward_model(rows, embedder, steps=150, seed=0, validation_fraction=0.25)
    assert diag["train_accuracy"] == 1.0 and diag["validation_accuracy"] >= 0.8, diag
    e = lambda texts: torch.as_tensor(np.asarray(embedder.embed(texts)), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        r_you = model(e(["Tell me about lamps"]), e(["You should keep your lamps dusted, you will see."]))
        r_plain = model(e(["Tell me about lamps"]), e(["Lamps are kept dusted for best results."]))
    assert float(r_you) > float(r_plain)
    unit = model.unit(torch.tensor([-1e6, 1e6]))
    assert unit.tolist() == [0.0, 1.0]


def test_users_gaussian_by_hand():
    from llm_safepref.methods.safe_cpl.stage2 import users_gaussian

    # Two dimensions, three users: means (1, 0.05), sample stds (1, 0.05 floored to 0.1).
    mu, sigma = users_gaussian({"b": [2.0, 0.0], "a": [0.0, 0.1], "c": [1.0, 0.05]})
    assert torch.allclose(mu, torch.tensor([1.0, 0.05]))
    assert torch.allclose(sigma, torch.tensor([1.0, 0.1]))
    assert torch.allclose(compose_z(torch.tensor([[1.0, -1.0]]), mu, sigma), torch.tensor([[2.0, -0.05]]))
    with pytest.raises(ValueError, match="at least 2 users"):
        users_gaussian({"a": [0.0, 0.0]})
