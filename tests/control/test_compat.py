import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.control


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))


def test_safety_gymnasium_imports_after_control_and_steps_with_cost():
    # A fresh interpreter, so the hook (not an earlier import in this process) does the work.
    proc = _run("""
        import control
        import safety_gymnasium
        env = safety_gymnasium.make('SafetyHalfCheetahVelocity-v1')
        obs, info = env.reset(seed=0)
        out = env.step(env.action_space.sample())
        assert len(out) == 6, len(out)  # obs, reward, cost, terminated, truncated, info
        assert out[2] in (0.0, 1.0), out[2]
        from safety_gymnasium.assets.color import COLOR
        from control.compat import FrozenColor
        assert all(isinstance(v, FrozenColor) for v in COLOR.values())
        print('OK', obs.shape)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (17,)" in proc.stdout


def test_without_shim_import_fails_on_this_python():
    # Guards that the shim is what makes the import work (not a silently fixed upstream).
    proc = _run("import safety_gymnasium")
    if proc.returncode == 0:
        pytest.skip("safety_gymnasium imports without the shim here (upstream fixed?)")
    assert "mutable default" in proc.stderr


def test_frozen_color_is_hashable_readonly_and_equal():
    from control.compat import FrozenColor, _freeze

    a = _freeze(np.array([0, 1, 0, 1.0]))
    assert isinstance(a, FrozenColor)
    assert hash(a) == hash(_freeze(np.array([0, 1, 0, 1.0])))
    assert np.array_equal(a, [0, 1, 0, 1])
    with pytest.raises(ValueError):
        a[0] = 3
