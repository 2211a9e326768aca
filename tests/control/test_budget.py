"""benchmarks/control_budget.py: the projection from measured times, by hand, and one real measurement at a glance.

The `small` measurement itself is minutes of CPU; its projection (what the suite's plan costs at the
current configs) is pure and checked here, plus one probe measured on smoke-sized steps.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from control.learners import default_config

pytestmark = pytest.mark.control
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "control_budget.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("control_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measured(phases, validation=0.5, evaluation=2.0, setup=1.0):
    return {"setup_seconds": setup, "phases": [{"entry_seconds": e, "per_step_seconds": p} for e, p in phases],
            "validation_seconds": validation, "evaluation_seconds": evaluation,
            "evaluation": {"validate_goals": 4, "validate_episodes": 1}}


def test_every_suite_method_and_artefact_has_a_probe(bench):
    from control.learners import ARTEFACTS, METHODS

    assert {bench.probe_of(m) for m in [*METHODS, *ARTEFACTS]} <= set(bench.PROBES)
    assert bench.probe_of("presa_k0.5") == "presa" and bench.probe_of("rc_0.5_imbalanced") == "rc"
    assert bench.probe_of("oracle") == "td3bc" and bench.probe_of("bc_warmup") == "presa"
    assert "safe_cpl_shared" not in bench.VALIDATION_METHODS and "presa_k2" in bench.VALIDATION_METHODS


def test_projection_by_hand(bench):
    cfg = default_config("presa", "run", "small")
    assert (cfg.bc_warmup_steps, cfg.steps, cfg.validate_every) == (500, 1500, 150)
    m = _measured([(1.0, 0.1), (2.0, 0.2)])
    # A PRESA run shares its warm-up: only the preference phase (entry + 999 steps) and the 7 validations after 500.
    run = bench.project("run", "presa", m)
    assert run["steps"] == [500, 1000] and run["n_validations"] == 7
    assert run["train_seconds"] == pytest.approx(2.0 + 999 * 0.2)
    assert run["seconds"] == pytest.approx(1.0 + 2.0 + 999 * 0.2 + 7 * 0.5 + 2.0)
    # The bc_warmup artefact carries the warm-up and its 3 validations (150, 300, 450), no final evaluation.
    warm = bench.project("run", "bc_warmup", m)
    assert warm["steps"] == [500, 0] and warm["n_validations"] == 3
    assert warm["seconds"] == pytest.approx(1.0 + 1.0 + 499 * 0.1 + 3 * 0.5)
    # Safe-VPL: three phases; validations in stage 2 only (after 1k + 3k steps: 4300, ..., 7000 = 10).
    vpl = bench.project("run", "safe_vpl", _measured([(0.1, 0.01), (0.2, 0.02), (0.3, 0.03)]))
    assert vpl["steps"] == [1000, 3000, 3000] and vpl["n_validations"] == 10
    assert vpl["train_seconds"] == pytest.approx(0.1 + 999 * 0.01 + 0.2 + 2999 * 0.02 + 0.3 + 2999 * 0.03)
    # A reward model never validates and is not evaluated.
    rm = bench.project("run", "reward_model", _measured([(0.5, 0.05)]))
    assert rm["n_validations"] == 0 and rm["evaluation_seconds"] == 0 and rm["seconds"] == pytest.approx(
        1.0 + 0.5 + 999 * 0.05)


def test_a_probe_measures_every_phase(bench, smoke_dataset, control_data_dir, tmp_path):
    ds = smoke_dataset("run")
    m = bench.measure("run", "safe_vpl", ds, 3, 0, tmp_path, str(control_data_dir), scale="smoke")
    assert len(m["phases"]) == 3 and m["steps_timed_per_phase"] == 3
    assert all(math.isfinite(p["per_step_seconds"]) and p["per_step_seconds"] > 0 for p in m["phases"])
    assert m["validation_seconds"] > 0 and m["evaluation_seconds"] > 0 and m["evaluation"]["horizon"] == 80
