import json

import numpy as np
import pytest

from control.data import (GAIT_TASKS, Dataset, DataError, dataset_path, load_dataset, load_or_build,
                          validate_dataset)
from control.tasks import TASKS

pytestmark = pytest.mark.control


@pytest.mark.parametrize("name", list(TASKS))
def test_smoke_dataset_builds_with_reward_cost_goals_and_provenance(smoke_dataset, name):
    ds = smoke_dataset(name)
    spec = ds.spec
    assert ds.n > 0 and ds.meta["n_transitions"] == ds.n
    assert ds["rewards"].shape == (ds.n, spec.n_users)
    # Stored per-user rewards are the reward function of the stored features.
    for u in range(spec.n_users):
        np.testing.assert_allclose(ds["rewards"][:, u], ds.reward_for(spec.user_goals[u]), rtol=1e-5, atol=1e-5)
    # Every user goal is pursued by the behaviour policy (both training and rollouts).
    assert set(range(spec.n_users)) <= set(np.unique(ds["goal_ids"]).tolist())
    # 0/1: SAC training / final SAC rollouts; 2/3: gait search / best gaits (GAIT_TASKS only).
    assert set(np.unique(ds["source"]).tolist()) == ({0, 1, 2, 3} if name in GAIT_TASKS else {0, 1})
    assert set(np.unique(ds["penalties"][ds["source"] == 1]).tolist()) == {0.0, 10.0}
    # Episodes are contiguous and consistent with their timesteps.
    b = ds.episode_bounds()
    assert (ds["timesteps"][b[:, 0]] == 0).all()
    assert (ds["terminals"] | ds["timeouts"])[b[:, 1] - 1].all()
    for key in ("task", "scale", "seed", "command", "format", "created_utc", "machine"):
        assert key in ds.meta
    if spec.cost_fn is not None:
        np.testing.assert_array_equal(ds["costs"], spec.cost(ds.features).astype(np.float32))


def test_save_load_roundtrip_and_cache(smoke_dataset, control_data_dir):
    ds = smoke_dataset("run")
    path = dataset_path("run", "smoke", 0, control_data_dir)
    assert path.exists() and path.with_suffix(".json").exists()
    again = load_or_build("run", "smoke", 0, control_data_dir)  # cache hit: same bytes
    assert again.meta["created_utc"] == ds.meta["created_utc"]
    for k in ds.arrays:
        np.testing.assert_array_equal(again[k], ds[k])
    assert json.loads(path.with_suffix(".json").read_text())["task"] == "run"


def _copy(ds):
    return Dataset({k: v.copy() for k, v in ds.arrays.items()}, dict(ds.meta))


def test_bad_data_gets_a_clear_error(smoke_dataset, tmp_path):
    ds = smoke_dataset("run")
    bad = _copy(ds)
    bad.arrays["observations"][17, 2] = np.nan
    with pytest.raises(DataError, match=r"'observations' has a NaN/inf at row 17"):
        validate_dataset(bad, source="x.npz")
    bad = _copy(ds)
    bad.arrays["costs"] = bad.arrays["costs"][:-3]
    with pytest.raises(DataError, match=r"column 'costs' has \d+ rows but 'actions' has \d+"):
        validate_dataset(bad)
    bad = _copy(ds)
    bad.arrays["goal_ids"][5] = 9
    with pytest.raises(DataError, match=r"'goal_ids' row 5 has goal id 9, which does not exist"):
        validate_dataset(bad)
    bad = _copy(ds)
    bad.meta["task"] = "pong"
    with pytest.raises(DataError, match="unknown task 'pong'"):
        validate_dataset(bad)
    # A corrupted file on disk is reported with its path.
    bad = _copy(ds)
    bad.arrays["actions"][0, 0] = np.inf
    p = tmp_path / "broken.npz"
    np.savez(p, **bad.arrays)
    p.with_suffix(".json").write_text(json.dumps(bad.meta))
    with pytest.raises(DataError, match=r"broken.npz: column 'actions' has a NaN/inf at row 0"):
        load_dataset(p)


def test_build_is_deterministic_for_a_seed():
    from control.data import build_dataset

    a = build_dataset("halfcheetah_vel", "smoke", seed=3, command="pytest")
    b = build_dataset("halfcheetah_vel", "smoke", seed=3, command="pytest")
    c = build_dataset("halfcheetah_vel", "smoke", seed=4, command="pytest")
    for k in a.arrays:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["observations"], c["observations"])


def test_default_data_dir_is_the_core_cache_root(monkeypatch, tmp_path):
    from control.data import default_data_dir
    from llm_safepref.core.paths import cache_root

    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit" / "control_data"
    # Without the variable, XDG_CACHE_HOME is honoured (as by the rest of the toolkit).
    monkeypatch.delenv("LLM_SAFEPREF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "llm_safepref" / "control_data" == cache_root() / "control_data"
    assert dataset_path("run", "smoke", 2) == default_data_dir() / "run__smoke__seed2.npz"


def test_build_metadata_is_the_core_run_record(smoke_dataset, control_data_dir):
    from llm_safepref.core.provenance import machine_description

    ds = smoke_dataset("run")
    for key in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert key in ds.meta, key
    assert ds.meta["machine"] == machine_description()
    assert ds.meta["versions"]["torch"] == __import__("torch").__version__
    on_disk = json.loads(dataset_path("run", "smoke", 0, control_data_dir).with_suffix(".json").read_text())
    assert on_disk["git_revision"] == ds.meta["git_revision"] and on_disk["command"] == "pytest"


def test_batch_collector_begins_a_batch_and_leaves_the_rest_idle():
    from control.collection import BatchCollector

    col = BatchCollector("run", n_envs=3, seed=0, horizon=4)
    try:
        assert (col.obs_dim, col.act_dim) == (7, 2) and col.dt > 0
        col.begin_batch([(0, -10.0, 0.3), (1, 10.0, 0.0)])
        assert col.done.tolist() == [False, False, True]
        while not col.done.all():
            assert (col.timesteps[:2] < 4).all()
            col.step(np.zeros((3, 2)), None, source=2, continue_=False, active=~col.done)
        assert [len(e["actions"]) for e in col.episodes] == [4, 4]
        assert [(int(e["goal_ids"][0]), float(e["penalties"][0]), float(e["noise"][0])) for e in col.episodes] == \
            [(0, -10.0, np.float32(0.3)), (1, 10.0, 0.0)]
        assert all(e["timeouts"][-1] and (e["source"] == 2).all() for e in col.episodes)
        with pytest.raises(ValueError, match="4 conditions for 3 envs"):
            col.begin_batch([(0, 0.0, 0.0)] * 4)
    finally:
        col.close()
