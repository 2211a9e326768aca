"""Safe-CPL and Safe-VPL on control: stage 1 on the crowd, stage-2 composition, through the one contract.

* Both methods train at smoke scale on real envs, log every phase's metrics under the shared
  names, checkpoint themselves and evaluate the composed policy on held-out downstream goals.
* The stage-1 losses are the core's: recomputed from the same sums by direct calls of
  ``cpl_loss`` / ``bradley_terry_loss`` / ``gaussian_kl`` and by hand (softplus).
* Stage 2 by hand: the offline eps labels (window features, the posterior, the clip), the
  transition reward ``r_task - ||eps||^2`` and the composed policy ``pi_low(s, mu + sigma 3 u)``.
* A run that crashes midway (in Safe-VPL's policy phase, in Safe-CPL's stage 2) resumes from its
  checkpoint and ends exactly as the uninterrupted run.
* The suite runs both (an imbalanced crowd through ``--set``); bad input names what is valid.
* The authors' shared encoder (``safe_cpl_shared`` / ``safe_vpl_shared``): the ``latent_encoder``
  artefact trained once; Safe-VPL continuing from it equals the self-contained run; Safe-CPL keeps
  it frozen; a mismatching artefact is refused, naming the field.
"""

import json
import math

import numpy as np
import pytest
import torch

from control.__main__ import main
from control.feedback import valid_segment_starts
from control.learners import METHODS, default_config, get_method, train, train_artefact
from control.learners.base import evaluate_downstream, run_learner
from control.learners.composition import ComposedPolicy
from control.learners.safe_cpl import SafeCPLLearner
from control.learners.safe_vpl import SafeVPLLearner
from control.suite import read_run_file
from control.tasks import get_spec
from llm_safepref.core.latent import CyclicKLSchedule, gaussian_kl
from llm_safepref.core.losses import bradley_terry_loss, cpl_loss
from llm_safepref.core.schema import Metric

pytestmark = pytest.mark.control
LATENT = ("safe_cpl", "safe_vpl")


def _rows(path):
    return [r for r in map(json.loads, open(path).read().splitlines()) if "event" not in r]


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("method", LATENT)
def test_latent_method_trains_every_phase_logs_and_evaluates(method, smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    res = train("run", method, 0, "smoke", tmp_path, data_dir=str(control_data_dir))
    cfg = res["config"]
    stage2_start = cfg["stage1_steps"] + cfg.get("policy_steps", 0)
    assert (cfg["latent_dim"], cfg["kl_weight"], cfg["penalty_weight"], cfg["eps_bound"]) == (4, 1e-3, 1.0, 3.0)
    m = res["metrics"]
    for key in (Metric.EVAL_NORMALIZED_REWARD, Metric.EVAL_NORMALIZED_COST, "eval/return_mean", "eval/cost_mean"):
        assert math.isfinite(m[key]), key
    assert m[Metric.EVAL_NORMALIZED_COST] == pytest.approx(m["eval/cost_mean"] / 10.0)  # Run's kappa
    # The last logged row is stage 2's TD3+BC over eps.
    assert {"loss/critic", "loss/actor", "composition/penalty"} <= set(m)
    rows = _rows(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(5, cfg["steps"] + 1, 5))
    stage1 = [r for r in rows if r["step"] <= cfg["stage1_steps"]]
    for r in stage1:
        assert {Metric.PREFERENCE_LOSS, Metric.LATENT_KL, Metric.KL_WEIGHT, Metric.REWARDS_ACCURACY} <= set(r)
        # The logged step s ran step index s - 1; its weight is the core schedule's (4 cycles of 5 steps).
        assert r[Metric.KL_WEIGHT] == pytest.approx(CyclicKLSchedule(1e-3, cfg["stage1_steps"], 4)(r["step"] - 1))
    later = [r for r in rows if r["step"] > cfg["stage1_steps"]]
    assert later and all("loss/critic" in r and Metric.LATENT_KL not in r for r in later)
    assert all("composition/penalty" in r for r in rows if r["step"] > stage2_start)
    if method == "safe_vpl":  # its policy phase relabels rewards with r(s, a, z)
        assert all("rewards/relabelled_mean" in r for r in rows if cfg["stage1_steps"] < r["step"] <= stage2_start)
    # Held-out downstream goals, never a user goal; the same evaluation as the baselines.
    user = get_spec("run").user_goals[:, 0]
    assert len(res["per_goal"]) == 2 and not any(abs(g["goal"][0] - u) < 1e-9 for g in res["per_goal"] for u in user)
    info = res["info"]
    assert info["crowd"]["n_train_sets"] == 18 and info["crowd"]["n_heldout_sets"] == 2
    assert 0.0 <= info["stage1"]["heldout_accuracy"] <= 1.0 and info["stage1"]["heldout_pairs"] == 8
    assert info["steps"] == {"phases": [cfg["stage1_steps"]] + ([cfg["policy_steps"]] if "policy_steps" in cfg
                                                                else []), "stage2": cfg["steps"] - stage2_start}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["method"] == method and ckpt["step"] == cfg["steps"] and ckpt["learner"]["multiplier"] is None
    assert {"encoder", "prior", "high_actor", "high_q1", "high_actor_target"} <= set(ckpt["learner"]["modules"])
    assert {"high_actor", "high_critic"} <= set(ckpt["learner"]["optimizers"])
    # A finished run resumes at its end: nothing retrained, the same numbers.
    again = train("run", method, 0, "smoke", tmp_path, data_dir=str(control_data_dir))
    assert again["train"]["resumed_from"] == cfg["steps"]
    assert again["metrics"] == m and again["per_goal"] == res["per_goal"]


def test_safe_cpl_on_a_two_dimensional_goal_task(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("reach")
    res = train("reach", "safe_cpl", 0, "smoke", tmp_path, data_dir=str(control_data_dir))
    assert math.isfinite(res["metrics"][Metric.EVAL_NORMALIZED_REWARD])
    assert all(not (np.abs(g["goal"]) == 8).all() for g in res["per_goal"])  # Reach's corners are the users


# --------------------------------------------------------------------------- the losses are the core's


def _noise_like(generator, shape):
    return torch.randn(shape, generator=generator)


def test_safe_cpl_stage1_loss_is_the_cores_cpl_plus_kl(smoke_dataset):
    ds = smoke_dataset("run")
    learner = SafeCPLLearner(default_config("safe_cpl", "run", "smoke"), ds, 0)
    sets = learner.crowd.train_sets[:3]
    state = learner.generator.get_state()
    terms = learner.stage1_terms(sets, step=1)
    # The same z by hand: mu + exp(logvar / 2) * noise from the same generator state.
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    with torch.no_grad():
        mu, logvar = learner.encoder(learner.crowd.features[sets])
        z = mu + (0.5 * logvar).exp() * _noise_like(g, mu.shape)
        torch.testing.assert_close(terms["z"], z)
        # CPL's unit-variance sums by hand, pair by pair: S = -sum_t ||pi_low(s_t, z) - a_t||^2.
        k, L = learner.crowd.set_size, learner.crowd.segment_length
        s_c, s_r = [], []
        for i, q in enumerate(sets):
            for j in range(k):
                for start, out in ((learner.crowd.chosen[q, j], s_c), (learner.crowd.rejected[q, j], s_r)):
                    obs = torch.as_tensor(ds["observations"][start:start + L])
                    act = torch.as_tensor(ds["actions"][start:start + L])
                    out.append(-((learner.pi_low(obs, z[i]) - act) ** 2).sum())
        s_c, s_r = torch.stack(s_c), torch.stack(s_r)
    torch.testing.assert_close(terms["chosen"], s_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["rejected"], s_r, rtol=1e-5, atol=1e-4)
    alpha, bias = 0.1, 0.5
    # KL weight of step 1: 1e-3 * 0.5 * (1 - cos(pi * 0.2 / 0.5)) (20 steps, 4 cycles of 5, ratio 0.5).
    w = 1e-3 * 0.5 * (1 - math.cos(math.pi * 0.4))
    assert float(terms["kl_weight"]) == pytest.approx(w)
    direct = cpl_loss(terms["chosen"], terms["rejected"], alpha=alpha, bias=bias).mean() + \
        w * gaussian_kl(mu, logvar, learner.prior.mean, learner.prior.logvar).mean()
    torch.testing.assert_close(terms["loss"], direct)
    # CPL by hand on the first pair: log(1 + exp(-(alpha S+ - lambda alpha S-))).
    x = alpha * terms["chosen"][0].item() - bias * alpha * terms["rejected"][0].item()
    assert terms["pref_losses"][0].item() == pytest.approx(math.log1p(math.exp(-x)), rel=1e-5)


def test_safe_vpl_reward_model_loss_is_the_cores_bradley_terry_plus_kl(smoke_dataset):
    ds = smoke_dataset("run")
    learner = SafeVPLLearner(default_config("safe_vpl", "run", "smoke"), ds, 0)
    sets = learner.crowd.train_sets[2:4]
    terms = learner.stage1_terms(sets, step=7)
    k, L = learner.crowd.set_size, learner.crowd.segment_length
    with torch.no_grad():
        mu, logvar = learner.encoder(learner.crowd.features[sets])
        r_c, r_r = [], []
        for i, q in enumerate(sets):
            for j in range(k):
                for start, out in ((learner.crowd.chosen[q, j], r_c), (learner.crowd.rejected[q, j], r_r)):
                    obs = torch.as_tensor(ds["observations"][start:start + L])
                    act = torch.as_tensor(ds["actions"][start:start + L])
                    out.append(learner.reward(obs, act, terms["z"][i]).sum())
        r_c, r_r = torch.stack(r_c), torch.stack(r_r)
    torch.testing.assert_close(terms["chosen"], r_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["rejected"], r_r, rtol=1e-5, atol=1e-5)
    # Step 7 lies at (7 % 5) / 5 = 0.4 of its 5-step cycle, still rising (ratio 0.5).
    w = 1e-3 * 0.5 * (1 - math.cos(math.pi * 0.4 / 0.5))
    assert float(terms["kl_weight"]) == pytest.approx(w)
    direct = bradley_terry_loss(terms["chosen"], terms["rejected"]).mean() + \
        w * gaussian_kl(mu, logvar, learner.prior.mean, learner.prior.logvar).mean()
    torch.testing.assert_close(terms["loss"], direct)
    margin = terms["chosen"][1].item() - terms["rejected"][1].item()
    assert terms["pref_losses"][1].item() == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)


def test_encoder_sees_observations_and_labels_not_actions(smoke_dataset):
    ds = smoke_dataset("run")
    learner = SafeCPLLearner(default_config("safe_cpl", "run", "smoke"), ds, 0)
    crowd = learner.crowd
    obs_dim = ds["observations"].shape[1]
    assert crowd.pair_dim == 4 * obs_dim + 1
    q, j, L = 3, 1, crowd.segment_length
    x = (ds["observations"] - learner.obs_mean) / learner.obs_std

    def f(start):  # time-mean and change over the segment, by hand
        seg = x[start:start + L]
        return np.concatenate([seg.mean(0), seg[-1] - seg[0]])

    feat = crowd.features[q, j].numpy()
    y = feat[-1]
    first, second = (crowd.chosen[q, j], crowd.rejected[q, j]) if y == 1 else (crowd.rejected[q, j],
                                                                                crowd.chosen[q, j])
    np.testing.assert_allclose(feat[:-1], np.concatenate([f(first), f(second)]), rtol=1e-4, atol=1e-5)
    ys = crowd.features[..., -1].numpy()
    assert set(np.unique(ys)) == {0.0, 1.0}  # the order is a coin flip, so the label is not the order


# --------------------------------------------------------------------------- stage 2 by hand


def test_stage2_labels_reward_and_composed_policy_by_hand(smoke_dataset):
    ds = smoke_dataset("run")
    cfg = default_config("safe_cpl", "run", "smoke")
    learner = SafeCPLLearner(cfg, ds, 0)
    comp = learner.stage2
    labels = comp.ensure_labels()
    assert labels.shape == (ds.n, 4) and np.abs(labels).max() <= 3.0
    L, K = learner.crowd.segment_length, learner.crowd.set_size
    # Smoke episodes: every row of a 16-step window shares its label; the first window by hand.
    s, e = ds.episode_bounds()[0]
    assert e - s >= 2 * L
    np.testing.assert_array_equal(labels[s:s + L], np.broadcast_to(labels[s], (L, 4)))
    x = (ds["observations"] - learner.obs_mean) / learner.obs_std
    f = lambda a, n: np.concatenate([x[a:a + n].mean(0), x[a + n - 1] - x[a]])  # noqa: E731
    rng = np.random.default_rng([0, 29])  # the run's seed; the window contexts' own stream
    n_windows = sum(max(1, (b - a) // L) for a, b in ds.episode_bounds())
    others = valid_segment_starts(ds, L)
    other = others[rng.integers(len(others), size=(n_windows, K))][0]
    window_first = (rng.random((n_windows, K)) < 0.5)[0]
    pairs = [np.concatenate([f(s, L), f(o, L), [1.0]]) if wf else np.concatenate([f(o, L), f(s, L), [0.0]])
             for o, wf in zip(other, window_first)]
    with torch.no_grad():
        mu, _ = learner.encoder(torch.as_tensor(np.stack(pairs), dtype=torch.float32)[None])
        sigma = (0.5 * learner.prior.logvar).exp()
        hand = ((mu[0] - learner.prior.mean) / sigma).clamp(-3, 3).numpy()
    np.testing.assert_allclose(labels[s], hand, rtol=1e-4, atol=1e-5)
    # An episode's tail shorter than a window joins its last window.
    lengths = np.diff(ds.episode_bounds(), axis=1)[:, 0]
    tails = [(a, b) for (a, b), n in zip(ds.episode_bounds(), lengths) if n % L and n > L]
    for a, b in tails[:3]:
        last = a + ((b - a) // L - 1) * L
        np.testing.assert_array_equal(labels[last:b], np.broadcast_to(labels[last], (b - last, 4)))
    # The transition reward: Run's -|v_x - g| minus ||eps||^2 (w = 1); the action is eps / 3.
    copy = np.random.default_rng()
    copy.bit_generator.state = learner.rng.bit_generator.state
    b = comp.batch()
    rows = copy.integers(ds.n, size=cfg.rl_batch_size)
    goals = comp.goals[copy.integers(len(comp.goals), size=cfg.rl_batch_size)]
    eps = labels[rows].astype(np.float64)
    hand_r = -np.abs(ds["feat__vx"][rows] - goals[:, 0]) - (eps ** 2).sum(1)
    np.testing.assert_allclose(b["reward"].numpy(), hand_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["act"].numpy(), eps / 3.0, rtol=1e-6)
    # The composed policy: pi_low(s, mu_prior + sigma_prior * 3 * high(s, g)).
    pol = learner.policy()
    assert isinstance(pol, ComposedPolicy)
    obs, goal = ds["observations"][:5], np.array([1.3])
    with torch.no_grad():
        o = torch.as_tensor(obs)
        u = comp.nets.actor(o, torch.tensor([[1.3]]).expand(5, 1))
        z = learner.prior.mean + sigma * 3.0 * u
        want = learner.pi_low(o, z).numpy()
    np.testing.assert_allclose(pol.act(obs, goal), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- resume after a crash


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method,overrides,crash_at,resume_at", [
    ("safe_vpl", {}, 34, 30),                       # in the z-conditioned policy phase (steps 20..39)
    ("safe_cpl", {"steps": "50"}, 43, 40),          # in stage 2 (steps 20..49): labels remade from the checkpoint
])
def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        method, overrides, crash_at, resume_at, smoke_dataset, tmp_path):
    ds = smoke_dataset("run")
    spec = get_method(method)
    cfg = default_config(method, "run", "smoke", overrides)

    def fresh():
        return spec.learner(cfg, ds, 3)

    ref = fresh()
    run_learner(ref, tmp_path / "ref")
    crashing = fresh()
    step_fn = crashing.train_step

    def train_step(step):
        if step == crash_at:
            raise _Crash(f"killed at step {step}")
        return step_fn(step)

    crashing.train_step = train_step
    with pytest.raises(_Crash):
        run_learner(crashing, tmp_path / "crashed")
    resumed = fresh()
    out = run_learner(resumed, tmp_path / "crashed")
    assert out["resumed_from"] == resume_at
    assert _rows(tmp_path / "crashed" / "log.jsonl") == _rows(tmp_path / "ref" / "log.jsonl")
    for name, module in ref.modules.items():
        for k, v in module.state_dict().items():
            torch.testing.assert_close(resumed.modules[name].state_dict()[k], v, rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.stage2.ensure_labels(), ref.stage2.ensure_labels())
    assert evaluate_downstream(resumed.policy(), ds, cfg, 3) == evaluate_downstream(ref.policy(), ds, cfg, 3)


# --------------------------------------------------------------------------- the suite and bad input


def test_the_suite_runs_both_with_an_imbalanced_crowd(smoke_dataset, control_data_dir, tmp_path, capsys):
    smoke_dataset("run")
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["suite", "--tasks", "run", "--scale", "smoke", "--out", str(out), "--work_dir", str(work),
            "--data_dir", str(control_data_dir), "--methods", *LATENT, "task_only", "oracle", "--seeds", "0",
            "--set", "safe_vpl:user_weights=[1,0]", "--aggregate"]
    assert main(args) == 0
    assert "4 jobs (0 done already)" in capsys.readouterr().out  # no artefact: each run trains its own encoder
    cpl = read_run_file(out / "runs" / "run__safe_cpl__seed0.json")
    vpl = read_run_file(out / "runs" / "run__safe_vpl__seed0.json")
    assert sum(cpl["info"]["crowd"]["sets_per_user"]) == 20 and min(cpl["info"]["crowd"]["sets_per_user"]) > 0
    assert vpl["info"]["crowd"]["sets_per_user"] == [20, 0] and vpl["config"]["user_weights"] == [1.0, 0.0]
    table = json.loads((out / "table.json").read_text())
    rows = {(r["task"], r["method"]): r for r in table["rows"]}
    for method in LATENT:
        r = rows[("run", method)]
        assert r["n_seeds"] == 1 and r["normalized_reward"] is not None and r["normalized_cost"] is not None
    assert main(args) == 0
    assert "4 jobs (4 done already)" in capsys.readouterr().out


def test_bad_input_names_what_is_valid(smoke_dataset, control_data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown method 'safe_dpo'; valid methods: .*safe_cpl, safe_vpl"):
        get_method("safe_dpo")
    assert main(["suite", "--tasks", "run", "--methods", "safe_cpl", "safe_dpo", "--out", str(tmp_path / "o"),
                 "--work_dir", str(tmp_path / "w"), "--data_dir", str(control_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) safe_dpo; valid methods:" in err and "safe_cpl, safe_vpl" in err
    assert {"safe_cpl", "safe_vpl"} <= set(METHODS)
    with pytest.raises(ValueError, match=r"steps=40 leaves no stage-2 step after the earlier phases' 40 \(20 \+ 20\)"):
        default_config("safe_vpl", "run", "smoke", {"steps": "40"})
    with pytest.raises(ValueError, match="encoder_hidden must be divisible"):
        default_config("safe_cpl", "run", "smoke", {"encoder_hidden": "30"})
    with pytest.raises(ValueError, match="cpl_bias in"):
        default_config("safe_cpl", "run", "smoke", {"cpl_bias": "1.5"})
    ds = smoke_dataset("run")
    with pytest.raises(ValueError, match="user_weights must be 2 non-negative numbers"):
        SafeCPLLearner(default_config("safe_cpl", "run", "smoke", {"user_weights": "[1, 1, 1]"}), ds, 0)


# --------------------------------------------------------------------------- the authors' shared encoder


def test_safe_vpl_shared_continues_the_latent_encoder_artefact_exactly(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    art = train_artefact("latent_encoder", "run", 0, "smoke", tmp_path / "enc", data_dir=str(control_data_dir))
    assert art["files"] == ["latent_encoder.pt", "latent_encoder.json"] and art["train"]["steps"] == 20
    assert 0.0 <= art["metrics"]["heldout/accuracy"] <= 1.0
    own = train("run", "safe_vpl", 0, "smoke", tmp_path / "own", data_dir=str(control_data_dir))
    shared = train("run", "safe_vpl_shared", 0, "smoke", tmp_path / "shared", data_dir=str(control_data_dir),
                   artefacts={"latent_encoder": str(tmp_path / "enc")})
    # Phase 1 is the artefact's: 20 fewer steps here, and the same numbers as the self-contained run after it.
    assert shared["config"]["steps"] == own["config"]["steps"] - 20 and shared["info"]["steps"]["phases"] == [0, 20]
    assert shared["per_goal"] == own["per_goal"] and shared["info"]["stage1"] == own["info"]["stage1"]
    own_rows = [{**r, "step": r["step"] - 20} for r in _rows(tmp_path / "own" / "log.jsonl") if r["step"] > 20]
    assert _rows(tmp_path / "shared" / "log.jsonl") == own_rows
    assert shared["info"]["latent_encoder"] == str(tmp_path / "enc")
    # The artefact's weights are the self-contained run's encoder, prior and reward model.
    enc = torch.load(tmp_path / "enc" / "latent_encoder.pt", weights_only=False)["modules"]
    ckpt = torch.load(tmp_path / "own" / "checkpoint.pt", weights_only=False)["learner"]["modules"]
    for name in ("encoder", "prior", "reward"):
        for k, v in enc[name].items():
            torch.testing.assert_close(ckpt[name][k], v, rtol=0, atol=0)


def test_safe_cpl_shared_freezes_the_encoder_and_trains_pi_low(smoke_dataset, control_data_dir, tmp_path):
    ds = smoke_dataset("run")
    train_artefact("latent_encoder", "run", 0, "smoke", tmp_path / "enc", data_dir=str(control_data_dir))
    enc = torch.load(tmp_path / "enc" / "latent_encoder.pt", weights_only=False)["modules"]
    cfg = default_config("safe_cpl_shared", "run", "smoke")
    assert cfg.shared_encoder and get_method("safe_cpl_shared").requires == ("latent_encoder",)
    learner = SafeCPLLearner(cfg, ds, 0, latent_encoder=str(tmp_path / "enc"))
    pi0 = {k: v.clone() for k, v in learner.pi_low.state_dict().items()}
    run_learner(learner, tmp_path / "run")
    for name in ("encoder", "prior"):
        for k, v in enc[name].items():
            torch.testing.assert_close(learner.modules[name].state_dict()[k], v, rtol=0, atol=0)
    assert any(not torch.equal(v, pi0[k]) for k, v in learner.pi_low.state_dict().items())
    rows = _rows(tmp_path / "run" / "log.jsonl")
    assert all(Metric.LATENT_KL in r for r in rows if r["step"] <= cfg.stage1_steps)
    # Refused: another seed's artefact (named), a shared config without the artefact, an artefact without it.
    with pytest.raises(ValueError, match=r"trained for another run: seed \(artefact 0, this run 1\)"):
        SafeCPLLearner(cfg, ds, 1, latent_encoder=str(tmp_path / "enc"))
    with pytest.raises(ValueError, match="shared_encoder=True needs the latent_encoder artefact"):
        SafeCPLLearner(cfg, ds, 0)
    with pytest.raises(ValueError, match="shared_encoder=True needs the latent_encoder artefact"):
        SafeVPLLearner(default_config("safe_vpl", "run", "smoke"), ds, 0, latent_encoder=str(tmp_path / "enc"))
    with pytest.raises(ValueError, match=r"set_size \(artefact 4, this run 5\)"):
        SafeCPLLearner(default_config("safe_cpl_shared", "run", "smoke", {"set_size": "5"}), ds, 0,
                       latent_encoder=str(tmp_path / "enc"))


def test_the_suite_trains_the_shared_encoder_once_for_both_methods(smoke_dataset, control_data_dir, tmp_path,
                                                                   capsys):
    smoke_dataset("run")
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["suite", "--tasks", "run", "--scale", "smoke", "--out", str(out), "--work_dir", str(work),
            "--data_dir", str(control_data_dir), "--methods", "safe_cpl_shared", "safe_vpl_shared", "--seeds", "0"]
    assert main(args) == 0
    assert "3 jobs (0 done already)" in capsys.readouterr().out  # one latent_encoder artefact, two runs
    enc = str(work / "artefacts" / "run__latent_encoder__seed0")
    for m in ("safe_cpl_shared", "safe_vpl_shared"):
        assert read_run_file(out / "runs" / f"run__{m}__seed0.json")["artefacts"] == {"latent_encoder": enc}
    assert json.loads((out / "artefacts" / "run__latent_encoder__seed0.json").read_text())["kind"] == "latent_encoder"
    (work / "artefacts" / "run__latent_encoder__seed0" / "latent_encoder.pt").unlink()  # a declared file missing
    assert main(args) == 0  # every run that reads it is done: not retrained
    assert "3 jobs (2 done already, 1 artefact(s) not needed" in capsys.readouterr().out
    assert not (work / "artefacts" / "run__latent_encoder__seed0" / "latent_encoder.pt").exists()
    (out / "runs" / "run__safe_vpl_shared__seed0.json").unlink()  # now a run needs it
    assert main(args) == 0
    assert "3 jobs (1 done already)" in capsys.readouterr().out  # the artefact is redone (from its checkpoint)
    assert (work / "artefacts" / "run__latent_encoder__seed0" / "latent_encoder.pt").exists()
