"""The CEM gait search of control.gaits at smoke scale (real Swimmer / Ant rollouts)."""

import numpy as np
import pytest

from control.gaits import GaitConfig, cpg_actions, heading, n_gait_params, search_gaits
from control.tasks import get_spec

pytestmark = pytest.mark.control


def test_heading_reads_swimmer_angle_and_ant_yaw():
    obs = np.zeros((2, 8))
    obs[:, 0] = [0.3, -1.2]
    np.testing.assert_allclose(heading("swimmer_vel", obs), [0.3, -1.2])
    yaw = np.array([np.pi / 2, -2.0])
    ant = np.zeros((2, 27))
    ant[:, 1], ant[:, 4] = np.cos(yaw / 2), np.sin(yaw / 2)  # quaternion (w, 0, 0, z) of a pure yaw
    np.testing.assert_allclose(heading("ant_vel", ant), yaw, atol=1e-12)
    with pytest.raises(ValueError, match="no heading for task 'run'"):
        heading("run", obs)


def test_cpg_actions_shape_bounds_and_steering():
    a_dim = 2
    p = np.zeros((3, n_gait_params(a_dim)))
    p[:, 1 + 3 * a_dim:] = 0.5  # steering gains only: wave amplitude 0, bias 0
    t = np.zeros(3)
    theta = np.zeros(3)
    a = cpg_actions(p, t, np.array([0.0, np.pi / 2, -np.pi / 2]), theta, dt=0.04)
    assert a.shape == (3, a_dim)
    np.testing.assert_allclose(a[:, 0], [0.0, 0.5, -0.5], atol=1e-12)  # k * sin(psi - theta_g)
    big = np.full((1, n_gait_params(a_dim)), 5.0)
    out = cpg_actions(big, np.arange(1.0), np.zeros(1), np.zeros(1), dt=0.04)
    assert (np.abs(out) <= 1.0).all()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="elites"):
        GaitConfig(population=2, elites=3)
    with pytest.raises(ValueError, match="keep"):
        GaitConfig(keep="some")


def test_search_gaits_smoke_keeps_real_rollouts_with_consistent_scores():
    cfg = GaitConfig(iters=2, population=3, elites=1, horizon=30, penalties=(0.0, 10.0), noise_levels=(0.2,),
                     swim_iters=1)
    eps, best, summary = search_gaits("swimmer_vel", cfg, n_envs=2, seed=0, rng=np.random.default_rng(0),
                                      final_horizon=40, goal_ids=[0, 2])
    spec = get_spec("swimmer_vel")
    assert set(best) == {(0, 0.0), (0, 10.0), (2, 0.0), (2, 10.0)}
    assert all(p.shape == (n_gait_params(2),) for p in best.values())
    search = [e for e in eps if e["source"][0] == 2]
    final = [e for e in eps if e["source"][0] == 3]
    # Elites of every iteration: the goal-free pre-search (goal id -1), then 4 (goal, lambda) searches.
    assert len(search) == cfg.swim_iters * cfg.elites + 4 * cfg.iters * cfg.elites
    assert [int(e["goal_ids"][0]) for e in search[:cfg.swim_iters]] == [-1] * cfg.swim_iters
    assert summary["goal_free_swim"]["best_score"] >= 0.0  # a net speed
    assert len(final) == 4  # one per (goal, lambda) x noise level
    assert all(len(e["actions"]) == 30 for e in search) and all(len(e["actions"]) == 40 for e in final)
    assert all(e["timeouts"][-1] for e in eps)
    # The recorded best objective is the mean of g . v - lambda * cost over a kept elite rollout.
    for u in (0, 2):
        for lam in (0.0, 10.0):
            g = spec.user_goals[u]
            mine = [e for e in search if e["goal_ids"][0] == u and e["penalties"][0] == lam]
            scores = [np.mean(g[0] * e["feat__vx"] + g[1] * e["feat__vy"] - lam * e["costs"]) for e in mine]
            assert summary[f"goal{u}_lambda{lam:g}"]["best_score"] == pytest.approx(max(scores), rel=1e-5)
    # Final rollouts carry their action-noise level.
    assert all(np.all(e["noise"] == np.float32(0.2)) for e in final)


def test_segment_report_agrees_with_dataset_statistics(smoke_dataset):
    from control.feedback import dataset_statistics
    from control.segment_report import unsafe_segments_by_condition

    ds = smoke_dataset("swimmer_vel")
    stats = dataset_statistics(ds, segment_length=16)
    rep = unsafe_segments_by_condition(ds, segment_length=16)
    unsafe = sum(r[0] for r in rep["by_goal"].values())
    total = sum(r[1] for r in rep["by_goal"].values())
    assert total == stats["n_segments"] == sum(r[1] for r in rep["by_condition"].values())
    assert unsafe / total == pytest.approx(stats["unsafe_segment_fraction"])
    # The smoke build holds SAC data (sources 0, 1) and gait-search data (2, 3).
    assert {k.rsplit("source", 1)[1] for k in rep["by_condition"]} == {"0", "1", "2", "3"}


def test_segment_report_cli_writes_the_run_record(smoke_dataset, control_data_dir, tmp_path, capsys):
    import json

    from control.segment_report import main, unsafe_segments_by_condition

    ds = smoke_dataset("swimmer_vel")
    out = tmp_path / "report.json"
    assert main(["--task", "swimmer_vel", "--scale", "smoke", "--data-dir", str(control_data_dir),
                 "--segment_length", "16", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    assert {"command", "git_revision", "versions", "lock_sha256", "machine", "date"} <= set(written)
    assert written["command"].startswith("python -m control.segment_report --task swimmer_vel")
    assert written["by_goal"] == json.loads(json.dumps(unsafe_segments_by_condition(ds, 16)))["by_goal"]
