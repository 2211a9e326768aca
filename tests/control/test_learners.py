"""control.learners: every method trains on smoke data through the one contract; hand-checked pieces.

* ``train(task, method, seed, scale, out_dir)`` runs every method, logs the shared metric names,
  checkpoints config + step + optimisers + multiplier, and resumes a finished run without retraining.
* Hand computations: held-out goals, the discounted cost budget, BC-safe's window filter,
  Oracle's and RC's rewards, PRESA's multiplier step, the reward model's Bradley–Terry loss.
* ``control/learners/`` imports nothing of ``llm_safepref`` but ``llm_safepref.core``.
"""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from control.feedback import segment_sums
from control.learners import (ARTEFACTS, METHODS, THRESHOLD_METHODS, CheckpointMismatch, apply_overrides,
                              artefact_files, default_config, train, train_artefact)
from control.learners.base import eval_goals, run_learner
from control.learners.bc_safe import safe_rows
from control.learners.presa import PresaLearner
from control.learners.rc import RCLearner, task_reward_std
from control.learners.reward_model import RewardModelLearner, imbalanced_user_weights
from control.learners.td3bc_lag import discounted_budget
from control.tasks import get_spec
from llm_safepref.core.schema import Metric

pytestmark = pytest.mark.control
ROOT = Path(__file__).resolve().parents[2]
LEARNER_FILES = sorted((ROOT / "control" / "learners").glob("*.py"))


# --------------------------------------------------------------------------- boundary


def _non_core_imports(source: str) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "llm_safepref" and (len(parts) < 2 or parts[1] != "core"):
                bad.append(f"line {node.lineno}: {name}")
    return bad


def test_learners_import_only_the_core_of_llm_safepref():
    assert _non_core_imports("import llm_safepref.core.losses\nfrom llm_safepref import data\n"
                             "def f():\n    import llm_safepref.methods\n") == ["line 2: llm_safepref",
                                                                            "line 4: llm_safepref.methods"]
    assert len(LEARNER_FILES) >= 10
    for path in [*LEARNER_FILES, ROOT / "control" / "suite.py"]:
        assert _non_core_imports(path.read_text()) == [], path.name


# --------------------------------------------------------------------------- hand computations


def test_eval_goals_exclude_user_goals_by_hand():
    run = get_spec("run")  # downstream = linspace(0.1, 5.0, 40); users 0.1 and 5.0
    goals = eval_goals(run, 2)
    step = 4.9 / 39
    np.testing.assert_allclose(goals[:, 0], [0.1 + step, 0.1 + 38 * step])
    assert len(eval_goals(run, 100)) == 38
    reach = get_spec("reach")  # 6 x 6 grid over [-8, 8]^2, its four corners are the users
    held = eval_goals(reach, 100)
    assert len(held) == 32 and not any((np.abs(held) == 8).all(1))


def test_discounted_cost_budget_by_hand():
    # kappa (1 - gamma^T) / ((1 - gamma) T) = 10 * 0.75 / (0.5 * 2)
    assert discounted_budget(10.0, 0.5, 2) == pytest.approx(7.5)
    # gamma -> 1: the per-step budget times T, i.e. kappa
    assert discounted_budget(10.0, 1 - 1e-9, 100) == pytest.approx(10.0, rel=1e-5)


def test_bc_safe_keeps_exactly_the_safe_windows(smoke_dataset):
    ds = smoke_dataset("run")
    L = 16
    rows, counts = safe_rows(ds, L, cost_threshold=1.0)
    expected = []
    for s, e in ds.episode_bounds():
        for start in range(s, e - L + 1, L):
            if ds["costs"][start:start + L].sum() <= 1.0 and ds["goal_ids"][start] >= 0:
                expected.extend(range(start, start + L))
    np.testing.assert_array_equal(rows, sorted(expected))
    assert counts["kept_windows"] * L == len(expected) and counts["threshold"] == 1.0
    assert 0 < counts["kept_windows"] < counts["windows"]  # the smoke data have both kinds


def test_apply_overrides_converts_and_checks():
    cfg = default_config("presa", "run", "smoke")
    new = apply_overrides(cfg, {"steps": "30", "safety_term": "false", "feedback_beta": "0.5",
                                "objective.safety_delta": "0.9", "label_noise": 0.1})
    assert (new.steps, new.safety_term, new.feedback_beta, new.objective.safety_delta, new.label_noise) == \
        (30, False, 0.5, 0.9, 0.1)
    assert cfg.steps == 40 and cfg.objective.safety_delta == 0.7  # the original is untouched
    with pytest.raises(ValueError, match="has no field 'stepz'; fields: .*steps"):
        apply_overrides(cfg, {"stepz": "1"})
    with pytest.raises(ValueError, match="bc_warmup_steps must lie in"):
        apply_overrides(cfg, {"steps": "10"})  # warm-up 15 >= steps
    with pytest.raises(ValueError, match="unknown method 'ppo'; valid methods: presa, cpl"):
        default_config("ppo", "run", "smoke")


def test_oracle_and_rc_rewards_by_hand(smoke_dataset, tmp_path):
    ds = smoke_dataset("run")
    oracle = METHODS["oracle"].learner(default_config("oracle", "run", "smoke"), ds, 0)
    rows = np.array([0, 5, 17, 300])
    goals = np.array([[0.5], [1.0], [2.0], [4.0]])
    vx = ds["feat__vx"][rows]
    task = -np.abs(vx - goals[:, 0])  # Run: r = -|v_x - v*|
    np.testing.assert_allclose(oracle.task_rewards(rows, goals), task)
    np.testing.assert_allclose(oracle.rewards(rows, goals), task - 10.0 * ds["costs"][rows])
    rm_dir = tmp_path / "rm"
    rm = RewardModelLearner(default_config("reward_model", "run", "smoke", {"steps": "5"}), ds, 0)
    run_learner(rm, rm_dir)
    rm.finalize(rm_dir)
    r_hat = np.load(rm_dir / "reward_per_row.npy")
    assert r_hat.shape == (ds.n,)
    rc = RCLearner(default_config("rc_0.25", "run", "smoke"), ds, 0, reward_model=str(rm_dir))
    sigma = task_reward_std(rc)
    centred = r_hat.astype(np.float64) - r_hat.mean()
    hand = 0.75 * task + 0.25 * centred[rows] / centred.std() * sigma
    np.testing.assert_allclose(rc.rewards(rows, goals), hand, rtol=1e-6)


def test_reward_model_loss_is_bradley_terry_by_hand(smoke_dataset):
    ds = smoke_dataset("run")
    rm = RewardModelLearner(default_config("reward_model", "run", "smoke"), ds, 0)
    pairs = rm.train_pairs[:3]
    losses, _ = rm.pair_terms(pairs)
    L = rm.segment_length
    with torch.no_grad():
        def seg_reward(start):
            obs = torch.as_tensor(ds["observations"][start:start + L])
            act = torch.as_tensor(ds["actions"][start:start + L])
            return float(rm.net(obs, act).sum())
        for i, p in enumerate(pairs):
            margin = seg_reward(rm.feedback["chosen"][p]) - seg_reward(rm.feedback["rejected"][p])
            assert losses[i].item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)
    # Held-out query sets are disjoint from the training ones.
    qs = rm.feedback["query_set_id"]
    assert not set(qs[rm.train_pairs]) & set(qs[rm.heldout_pairs])


def test_presa_reference_is_the_bc_policy_and_nu_moves_by_the_core_rule(smoke_dataset):
    ds = smoke_dataset("run")
    cfg = default_config("presa", "run", "smoke", {"bc_warmup_steps": "4", "steps": "10"})
    learner = PresaLearner(cfg, ds, 0)
    for step in range(4):
        assert Metric.BC_LOSS in learner.train_step(step)
    bc_state = {k: v.clone() for k, v in learner.pi.state_dict().items()}
    nu_before = learner.multiplier.value
    metrics = learner.train_step(4)
    # nu <- clip(nu + lr (delta - mean p), 0, nu_max): lr 0.5, delta 0.7, nu_max 10.
    hand = min(max(nu_before + 0.5 * (0.7 - metrics[Metric.PROB_MEAN]), 0.0), 10.0)
    assert metrics[Metric.NU] == pytest.approx(hand, rel=1e-6)
    assert metrics[Metric.CONSTRAINT] == pytest.approx(0.7 - metrics[Metric.PROB_MEAN], rel=1e-6)
    for step in range(5, 10):
        learner.train_step(step)
    for k, v in learner.pi_ref.state_dict().items():  # frozen at the end of the warm-up
        torch.testing.assert_close(v, bc_state[k])
    assert any(not torch.equal(v, bc_state[k]) for k, v in learner.pi.state_dict().items())
    assert learner.info()["n_goals"] == 40  # pairs spread over Run's downstream grid


# --------------------------------------------------------------------------- every method, the contract


@pytest.fixture(scope="module")
def artefact_dirs(smoke_dataset, control_data_dir, tmp_path_factory):
    """Every artefact of ``ARTEFACTS`` trained once on the smoke Run data for seed 1 (the runs' seed): kind -> folder."""
    smoke_dataset("run")
    dirs = {}
    for kind in ARTEFACTS:
        out = tmp_path_factory.mktemp(kind)
        rec = train_artefact(kind, "run", 1, "smoke", out, data_dir=str(control_data_dir),
                             artefacts={k: str(dirs[k]) for k in ARTEFACTS[kind].requires})
        assert rec["info"]["n_rows"] == smoke_dataset("run").n
        assert rec["files"] == list(artefact_files(kind))
        assert all((out / name).exists() for name in artefact_files(kind))
        if kind != "bc_warmup":  # a BC warm-up has no held-out preference check
            assert rec["metrics"]["heldout/accuracy"] is not None
        dirs[kind] = out
    return dirs


def test_the_imbalanced_reward_model_sees_an_imbalanced_crowd(artefact_dirs):
    balanced = json.loads((artefact_dirs["reward_model"] / "reward_model.json").read_text())
    imbalanced = json.loads((artefact_dirs["reward_model_imbalanced"] / "reward_model.json").read_text())
    assert balanced["crowd_config"]["user_weights"] is None
    assert imbalanced["crowd_config"]["user_weights"] == [4.0, 1.0]  # Run's two users, user 0 four times as often
    n = imbalanced["sets_per_user"]
    assert sum(n) == 20 and n[0] > n[1]  # 20 smoke query sets, drawn 4 : 1
    assert sum(balanced["sets_per_user"]) == 20
    r_b = np.load(artefact_dirs["reward_model"] / "reward_per_row.npy")
    r_i = np.load(artefact_dirs["reward_model_imbalanced"] / "reward_per_row.npy")
    assert r_b.shape == r_i.shape and not np.array_equal(r_b, r_i)


def test_the_imbalance_arms_share_one_setting():
    assert imbalanced_user_weights("run") == [4.0, 1.0] and imbalanced_user_weights("ant_vel") == [4.0, 1, 1, 1]
    for task in ("run", "ant_vel"):
        for method in ("safe_cpl_imbalanced", "safe_vpl_imbalanced"):
            assert default_config(method, task, "smoke").user_weights == imbalanced_user_weights(task)
        assert default_config("reward_model_imbalanced", task, "smoke").user_weights == imbalanced_user_weights(task)
        assert default_config("safe_cpl", task, "smoke").user_weights is None
    assert METHODS["rc_0.5_imbalanced"].requires == ("reward_model_imbalanced",)
    assert ARTEFACTS["reward_model_imbalanced"].provides == "reward_model"  # it reaches RC as reward_model=
    assert default_config("rc_0.5_imbalanced", "run", "smoke").weight == 0.5


def test_threshold_arms_scale_the_threshold_each_method_reads(smoke_dataset):
    """presa_k<s>: safety labels at s x kappa L / T; bc_safe_k<s>: kept windows; td3bc_lag_k<s>: the budget."""
    from control.feedback import segment_cost_threshold
    from control.learners import THRESHOLD_METHODS, THRESHOLD_SCALES, threshold_arm

    ds = smoke_dataset("run")
    assert threshold_arm("presa", 1.0) == "presa" and threshold_arm("presa", 0.5) == "presa_k0.5"
    for method in THRESHOLD_METHODS:
        for scale in THRESHOLD_SCALES:
            arm = threshold_arm(method, scale)
            cfg = default_config(arm, "run", "smoke")
            assert cfg.cost_threshold_scale == scale
            learner = METHODS[arm].learner(cfg, ds, 0)
            info = learner.info()
            if method == "presa":
                base = segment_cost_threshold(ds, cfg.segment_length)
                assert info["segment_cost_threshold"] == pytest.approx(base * scale)
            elif method == "bc_safe":
                assert learner.counts["threshold"] == pytest.approx(segment_cost_threshold(ds, cfg.segment_length) * scale)
            else:
                assert info["episode_cost_budget"] == pytest.approx(ds.spec.cost_threshold * scale)
    with pytest.raises(ValueError, match="cost_threshold_scale must be > 0"):
        default_config("presa", "run", "smoke", {"cost_threshold_scale": 0})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_logs_checkpoints_and_evaluates(method, smoke_dataset, control_data_dir,
                                                            artefact_dirs, tmp_path):
    smoke_dataset("run")
    spec = METHODS[method]
    base = next((m for m in THRESHOLD_METHODS if method.startswith(m + "_k")), method)  # a threshold arm's method
    artefacts = {kind: str(artefact_dirs[kind]) for kind in spec.requires} or None
    res = train("run", method, 1, "smoke", tmp_path, data_dir=str(control_data_dir), artefacts=artefacts)
    m = res["metrics"]
    assert res["train"]["resumed_from"] is None and res["train"]["steps"] == res["config"]["steps"]
    for key in (Metric.EVAL_NORMALIZED_REWARD, Metric.EVAL_NORMALIZED_COST, "eval/return_mean", "eval/cost_mean"):
        assert math.isfinite(m[key]), key
    assert m["eval/goals"] == 2 and len(res["per_goal"]) == 2
    user = get_spec("run").user_goals[:, 0]
    assert not any(abs(g["goal"][0] - u) < 1e-9 for g in res["per_goal"] for u in user)
    # The normalised cost is DSRL's C / kappa of the same episodes.
    assert m[Metric.EVAL_NORMALIZED_COST] == pytest.approx(m["eval/cost_mean"] / 10.0)
    expected = {"presa": {Metric.PREFERENCE_LOSS, Metric.PROB_MEAN, Metric.NU, Metric.CONSTRAINT},
                "cpl": {Metric.PREFERENCE_LOSS, Metric.PROB_MEAN},
                "bc_safe": {Metric.BC_LOSS},
                "td3bc_lag": {"loss/critic", "loss/cost_critic", Metric.NU}}.get(base, {"loss/critic", "loss/actor"})
    assert expected <= set(m), (method, sorted(m))
    assert (Metric.NU in m) == (base in ("presa", "td3bc_lag"))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, res["config"]["steps"] + 1, 5))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == res["config"]["steps"] and ckpt["method"] == METHODS[method].learner.method
    assert ckpt["config"] == res["config"]
    assert set(ckpt["learner"]["optimizers"]) and ckpt["learner"]["numpy_rng"]
    assert (ckpt["learner"]["multiplier"] is not None) == (base in ("presa", "td3bc_lag"))
    # A finished run resumes at its end: no training, the same metrics.
    again = train("run", method, 1, "smoke", tmp_path, data_dir=str(control_data_dir), artefacts=artefacts)
    assert again["train"]["resumed_from"] == res["config"]["steps"]
    assert again["metrics"] == m and again["per_goal"] == res["per_goal"]


def _policy_and_log(folder: Path):
    state = torch.load(folder / "checkpoint.pt", weights_only=False)["learner"]
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return state, [r for r in rows if r.get("event") != "warm_start"]


def test_presa_type_runs_start_from_the_shared_bc_warmup_exactly(smoke_dataset, control_data_dir, artefact_dirs,
                                                                 tmp_path):
    """PRESA, CPL-only and a threshold arm from the ``bc_warmup`` artefact equal their from-scratch runs bit for bit
    (weights, optimiser, multiplier, log, metrics); the warm start skips the warm-up; another config trains its own."""
    smoke_dataset("run")
    warm = {"bc_warmup": str(artefact_dirs["bc_warmup"])}
    assert torch.load(artefact_dirs["bc_warmup"] / "bc_warmup.pt", weights_only=False)["step"] == 15
    for method in ("presa", "cpl", "presa_k2"):
        plain = train("run", method, 1, "smoke", tmp_path / f"{method}_plain", data_dir=str(control_data_dir))
        shared = train("run", method, 1, "smoke", tmp_path / f"{method}_warm", data_dir=str(control_data_dir),
                       artefacts=warm)
        assert plain["info"]["bc_warmup"]["shared"] is False
        assert shared["info"]["bc_warmup"] == {"shared": True, "from": warm["bc_warmup"], "step": 15}
        assert shared["metrics"] == plain["metrics"] and shared["per_goal"] == plain["per_goal"]
        a, log_a = _policy_and_log(tmp_path / f"{method}_plain")
        b, log_b = _policy_and_log(tmp_path / f"{method}_warm")
        assert log_a == log_b, method
        for k in a["modules"]["policy"]:
            assert torch.equal(a["modules"]["policy"][k], b["modules"]["policy"][k]), (method, k)
            assert torch.equal(a["modules"]["reference"][k], b["modules"]["reference"][k]), (method, k)
        assert a["multiplier"] == b["multiplier"] and a["numpy_rng"] == b["numpy_rng"]
        events = [json.loads(x) for x in (tmp_path / f"{method}_warm" / "log.jsonl").read_text().splitlines()]
        assert {"event": "warm_start", "step": 15, "from": warm["bc_warmup"]} in events
    # The warm-up steps are not trained again: the learner is never asked for a step before 15.
    calls = []
    original = PresaLearner.train_step
    try:
        PresaLearner.train_step = lambda self, step: (calls.append(step), original(self, step))[1]
        train("run", "presa", 1, "smoke", tmp_path / "counted", data_dir=str(control_data_dir), artefacts=warm)
    finally:
        PresaLearner.train_step = original
    assert calls == list(range(15, 40))
    # A config that differs where the warm-up reads it trains its own warm-up, and says why.
    other = train("run", "presa", 1, "smoke", tmp_path / "lr", data_dir=str(control_data_dir), artefacts=warm,
                  overrides={"lr": "0.001"})
    assert other["info"]["bc_warmup"]["shared"] is False and "trained with other lr" in other["info"]["bc_warmup"][
        "reason"]
    assert other["train"]["resumed_from"] is None
    with pytest.raises(FileNotFoundError, match="no BC warm-up there; train it with train_artefact"):
        train("run", "presa", 1, "smoke", tmp_path / "none", data_dir=str(control_data_dir),
              artefacts={"bc_warmup": str(tmp_path / "missing")})


def test_a_presa_ensemble_starts_from_each_members_bc_warmup(smoke_dataset, control_data_dir, tmp_path):
    from control.learners import train_ensemble

    smoke_dataset("run")
    arts = []
    for seed in (0, 1):
        train_artefact("bc_warmup", "run", seed, "smoke", tmp_path / f"bcw{seed}", data_dir=str(control_data_dir))
        arts.append({"bc_warmup": str(tmp_path / f"bcw{seed}")})
    recs = train_ensemble("run", "cpl", [0, 1], "smoke", [tmp_path / "m0", tmp_path / "m1"],
                          data_dir=str(control_data_dir), artefacts=arts)
    for seed, rec in zip((0, 1), recs):
        assert rec["info"]["bc_warmup"]["shared"] is True and rec["artefacts"] == arts[seed]
        alone = train("run", "cpl", seed, "smoke", tmp_path / f"alone{seed}", data_dir=str(control_data_dir))
        assert rec["metrics"][Metric.EVAL_NORMALIZED_REWARD] == pytest.approx(
            alone["metrics"][Metric.EVAL_NORMALIZED_REWARD], abs=1e-4)
    with pytest.raises(ValueError, match="2 seeds and 1 artefact mappings"):
        train_ensemble("run", "cpl", [0, 1], "smoke", [tmp_path / "x0", tmp_path / "x1"],
                       data_dir=str(control_data_dir), artefacts=arts[:1])


def test_a_checkpoint_of_another_config_is_refused(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    train("run", "bc_safe", 0, "smoke", tmp_path, data_dir=str(control_data_dir), overrides={"steps": "10"})
    with pytest.raises(CheckpointMismatch, match=r"config differs in steps \(checkpoint 10, this run 12\)"):
        train("run", "bc_safe", 0, "smoke", tmp_path, data_dir=str(control_data_dir), overrides={"steps": "12"})


def test_learners_on_a_mujoco_task(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("halfcheetah_vel")
    for method in ("presa", "td3bc_lag"):
        res = train("halfcheetah_vel", method, 0, "smoke", tmp_path / method, data_dir=str(control_data_dir))
        assert math.isfinite(res["metrics"][Metric.EVAL_NORMALIZED_REWARD])
        assert res["metrics"]["eval/horizon"] == 80  # the smoke data's episode length
        assert all(abs(g["goal"][0]) < 1 for g in res["per_goal"])  # +-1 are the users
