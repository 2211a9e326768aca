import numpy as np
import pytest

from control.tasks import TASKS, get_spec, make_task

pytestmark = pytest.mark.control

ALL = list(TASKS)


@pytest.mark.parametrize("name", ALL)
def test_constructs_steps_and_reports_cost(name):
    env = make_task(name, user_id=0, seed=1)
    try:
        obs, info = env.reset()
        assert obs.shape == env.observation_space.shape and np.all(np.isfinite(obs))
        spec = env.task
        rng = np.random.default_rng(0)
        for _ in range(20):
            obs, r, term, trunc, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
            assert info["cost"] in (0.0, 1.0)
            assert set(info["features"]) == set(spec.feature_names)
            one = {k: np.array([v]) for k, v in info["features"].items()}
            # The returned reward is the goal-conditioned reward function of the features.
            assert r == pytest.approx(float(spec.reward(one, env.goal)[0]))
            if spec.cost_fn is not None:
                assert info["cost"] == float(spec.cost(one)[0])
            if term:
                env.reset()
    finally:
        env.close()


def _f(**kw):
    return {k: np.array([v], dtype=float) for k, v in kw.items()}


def test_velocity_reward_and_cost_of_known_states():
    ant = get_spec("ant_vel")
    f = _f(vx=2.0, vy=-1.0, ctrl_cost=0.5, healthy_reward=1.0)
    assert ant.reward(f, [0.0, 1.0])[0] == pytest.approx(-1.0 + 1.0 - 0.5)
    assert ant.reward(f, [1.0, 0.0])[0] == pytest.approx(2.0 + 1.0 - 0.5)
    assert ant.cost(f)[0] == 0.0  # |v| = 2.236 < 2.6222
    assert ant.cost(_f(vx=3.0, vy=-1.0, ctrl_cost=0, healthy_reward=1))[0] == 1.0
    hc = get_spec("halfcheetah_vel")
    f = _f(vx=-4.0, vy=0.0, ctrl_cost=0.2, healthy_reward=0.0)
    assert hc.reward(f, [-1.0, 0.0])[0] == pytest.approx(4.0 - 0.2)
    assert hc.reward(f, [0.5, 0.0])[0] == pytest.approx(-2.0 - 0.2)
    assert hc.cost(f)[0] == 1.0  # backward running is limited too
    sw = get_spec("swimmer_vel")
    assert sw.cost(_f(vx=0.2, vy=0.1, ctrl_cost=0, healthy_reward=0))[0] == 0.0  # 0.2236 < 0.2282
    assert sw.cost(_f(vx=0.2, vy=0.12, ctrl_cost=0, healthy_reward=0))[0] == 1.0


def test_bullet_reward_and_cost_of_known_states():
    reach = get_spec("reach")
    f = _f(x0=0.0, y0=0.0, x1=1.0, y1=0.0, vx=0.0, vy=0.0)
    assert reach.reward(f, [8.0, 8.0])[0] == pytest.approx(3 * (np.hypot(8, 8) - np.hypot(7, 8)))
    run = get_spec("run")
    assert run.reward(_f(x0=0, y0=0, x1=0, y1=0, vx=3.0, vy=0), [5.0])[0] == pytest.approx(-2.0)
    assert run.cost(_f(x0=0, y0=0, x1=0, y1=0.5, vx=3.0, vy=0))[0] == 1.0  # too fast
    assert run.cost(_f(x0=0, y0=0, x1=0, y1=1.5, vx=1.0, vy=0))[0] == 1.0  # outside corridor
    assert run.cost(_f(x0=0, y0=0, x1=0, y1=0.5, vx=1.0, vy=0))[0] == 0.0
    circle = get_spec("circle")
    f = _f(x0=4, y0=0, x1=4.0, y1=0.0, vx=0.0, vy=-2.0)  # clockwise at (4, 0)
    assert circle.reward(f, [4.0])[0] == pytest.approx(0.1 * 8.0)
    assert circle.reward(f, [7.0])[0] == pytest.approx(0.1 * 8.0 / 4.0)
    assert circle.cost(_f(x0=0, y0=0, x1=6.5, y1=0, vx=0, vy=0))[0] == 1.0


def test_simulator_state_gives_the_cost():
    # Put the Ball outside Run's corridor / Circle's boundary in the real simulator.
    env = make_task("run", seed=0)
    env.reset()
    env.simulator.agent.set_position(np.array([0.0, 1.5, 0.5]))
    _, _, _, _, info = env.step(np.zeros(2))
    assert info["cost"] == 1.0 and abs(info["features"]["y1"]) > 1.0
    env.close()
    env = make_task("circle", seed=0)
    env.reset()
    env.simulator.agent.set_position(np.array([6.5, 0.0, 0.5]))
    _, _, _, _, info = env.step(np.zeros(2))
    assert info["cost"] == 1.0 and info["env_cost"] == 1.0  # agrees with Bullet's own cost
    env.close()
    # HalfCheetah: our features are the simulator's x-velocity; for forward motion our cost
    # and safety-gymnasium's one-sided cost agree.
    env = make_task("halfcheetah_vel", seed=0)
    env.reset()
    for _ in range(30):
        _, _, _, _, info = env.step(np.ones(6))
        if info["features"]["vx"] > 0:
            assert info["cost"] == info["env_cost"]
    env.close()


def test_goal_switching_changes_the_reward():
    env = make_task("ant_vel", user_id=0, seed=3)
    env.reset()
    _, r0, _, _, info = env.step(np.zeros(8))
    env.set_goal([0.0, -1.0])
    assert np.allclose(env.goal, [0.0, -1.0])
    _, r1, _, _, info1 = env.step(np.zeros(8))
    f = {k: np.array([v]) for k, v in info1["features"].items()}
    assert r1 == pytest.approx(float(env.task.reward(f, [0.0, -1.0])[0]))
    obs, info = env.reset(options={"goal": [1.0, 0.0]})
    assert np.allclose(info["goal"], [1.0, 0.0])
    env.close()
    with pytest.raises(ValueError, match="outside the valid range"):
        make_task("run", goal=[9.0])
    with pytest.raises(ValueError, match="unknown user/goal id 7"):
        make_task("reach", user_id=7)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("pong")


@pytest.mark.parametrize("name", ALL)
def test_seeding_is_deterministic(name):
    def trace(seed):
        env = make_task(name, user_id=0)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        rng = np.random.default_rng(5)
        for _ in range(10):
            o, r, term, trunc, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
            out.append(np.r_[o, r, info["cost"]])
        env.close()
        return np.concatenate(out)

    a, b, c = trace(11), trace(11), trace(12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_swimmer_tip_velocity_jitters_but_centre_of_mass_does_not():
    # Why swimmer_vel uses centre-of-mass velocity (docs/control.md).
    env = make_task("swimmer_vel", user_id=0, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    tip, com = [], []
    for _ in range(200):
        before = env.simulator.data.qpos[0:2].copy()  # front tip, as safety-gymnasium measures it
        _, _, _, _, info = env.step(rng.uniform(-1, 1, 2))
        tip.append(np.linalg.norm(env.simulator.data.qpos[0:2] - before) / env.simulator.dt)
        com.append(np.hypot(info["features"]["vx"], info["features"]["vy"]))
    env.close()
    assert np.mean(np.array(tip) > 0.2282) > 0.5
    assert np.mean(np.array(com) > 0.2282) < 0.05
