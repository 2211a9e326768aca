import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.control
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_builds_in_a_worker_process_then_stats_and_feedback(tmp_path):
    d = str(tmp_path)
    # --jobs 2 goes through the process pool; with one task only one worker (one core) runs.
    out = _cli("build-data", "--tasks", "run", "--scale", "smoke", "--data-dir", d, "--jobs", "2")
    assert "[run]" in out
    meta = json.loads((tmp_path / "run__smoke__seed0.json").read_text())
    assert meta["command"].startswith("python -m control build-data --tasks run --scale smoke")
    _cli("stats", "--tasks", "run", "--scale", "smoke", "--data-dir", d, "--out", d + "/s.json")
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) == {"run"}
    assert stats["run"]["n_transitions"] == meta["n_transitions"]
    _cli("feedback", "--task", "run", "--scale", "smoke", "--data-dir", d, "--kind", "presa", "--n", "20",
         "--out", d + "/fb.npz")
    fb = np.load(d + "/fb.npz")
    assert fb["chosen"].shape == (20,) and fb["chosen_is_safe"].dtype == bool
    assert "tasks" in _cli("--help") or "build-data" in _cli("--help")
