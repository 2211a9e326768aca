"""Periodic validation during training and the "levelled off" verdict behind "undertrained" in the table.

* ``levelled_off`` against hand computations (least-squares rise over the last quarter, tolerance).
* ``run_learner`` validates every ``validate_every`` steps on held-out goals that are not the final
  evaluation's, and trains exactly as a run without validation (same log rows, same weights).
* Latent learners validate in stage 2 only; a reward model never.
* A checkpoint made without validation resumes with it (validation fields change no training step).
* ``aggregate`` marks a (task, method) "undertrained" when a seed's curve did not level off.
"""

import json
import math

import numpy as np
import pytest
import torch

from control.learners import ARTEFACTS, default_config, get_method, train
from control.learners.base import eval_goals, run_learner, validation_goals
from control.learners.validation import levelled_off, read_validation, summarize_validation, validation_curve
from control.suite import RUN_FORMAT, aggregate
from control.tasks import get_spec
from llm_safepref.core.provenance import write_json
from llm_safepref.core.schema import Metric

pytestmark = pytest.mark.control


def _lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


# --------------------------------------------------------------------------- the criterion by hand


def test_levelled_off_by_hand():
    steps = np.arange(1, 9) * 100.0  # 8 points: the tail is the last max(3, ceil(8 / 4)) = 3
    rising = np.linspace(0.1, 0.8, 8)  # 0.1 per point: tail slope 0.1 / 100, span 200 -> rise 0.2
    res = levelled_off(steps, rising)
    assert res["tail_points"] == 3 and res["tail_rise"] == pytest.approx(0.2)
    assert res["range"] == pytest.approx(0.7) and res["tolerance"] == pytest.approx(0.07)
    assert res["levelled_off"] is False
    flat_tail = np.array([0.1, 0.4, 0.6, 0.7, 0.75, 0.80, 0.81, 0.80])
    # Tail (0.80, 0.81, 0.80): least-squares slope 0 -> rise 0 <= max(0.1 * 0.71, 0.02).
    res = levelled_off(steps, flat_tail)
    assert res["tail_rise"] == pytest.approx(0.0, abs=1e-12) and res["levelled_off"] is True
    # A falling tail is levelled off; a small rise under the absolute floor 0.02 too.
    assert levelled_off(steps, rising[::-1])["levelled_off"] is True
    tiny = np.full(8, 0.5) + np.array([0, 0, 0, 0, 0, 0.0, 0.005, 0.01])  # rise 0.01, range 0.01 -> tol 0.02
    assert levelled_off(steps, tiny)["tail_rise"] == pytest.approx(0.01) and levelled_off(steps, tiny)["levelled_off"]
    # 16 points: the tail is the last 4; rise = slope * span over those four.
    s16, v16 = np.arange(16.0), np.r_[np.zeros(12), [0.0, 0.1, 0.2, 0.3]]
    res = levelled_off(s16, v16)
    assert res["tail_points"] == 4 and res["tail_rise"] == pytest.approx(0.3) and res["levelled_off"] is False
    assert levelled_off(steps[:3], rising[:3])["levelled_off"] is None  # too few points to say
    with pytest.raises(ValueError, match="one length"):
        levelled_off(steps, rising[:5])


def test_read_validation_keeps_the_last_line_of_a_step_and_skips_broken_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([
        json.dumps({"step": 10, "loss": 1.0}),
        json.dumps({"step": 10, "event": "validation", Metric.EVAL_NORMALIZED_REWARD: 0.1}),
        json.dumps({"step": 20, "event": "validation", Metric.EVAL_NORMALIZED_REWARD: 0.2}),
        json.dumps({"event": "resume", "step": 10}),
        json.dumps({"step": 20, "event": "validation", Metric.EVAL_NORMALIZED_REWARD: 0.25}),
        '{"step": 30, "event": "valid',  # half-written by a kill
    ]) + "\n")
    rows = read_validation(log)
    assert [r["step"] for r in rows] == [10, 20] and rows[1][Metric.EVAL_NORMALIZED_REWARD] == 0.25
    steps, values = validation_curve(rows)
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_array_equal(values, [0.1, 0.25])
    assert read_validation(tmp_path / "missing.jsonl") == []
    summary = summarize_validation(rows)
    assert summary["points"] == [[10, 0.1, None], [20, 0.25, None]] and summary["levelled_off"] is None


# --------------------------------------------------------------------------- during training


def test_validation_goals_are_held_out_and_not_the_evaluations():
    run = get_spec("run")
    ev, val = eval_goals(run, 8), validation_goals(run, 4, 8)
    assert len(val) == 4
    assert not (np.abs(val[:, None, :] - ev[None]).max(-1) < 1e-9).any()
    assert not (np.abs(val[:, None, :] - run.user_goals[None]).max(-1) < 1e-9).any()
    # Every held-out goal evaluated (paper scale): the validation falls back to the evaluation's goals.
    np.testing.assert_array_equal(validation_goals(run, 4, 100), eval_goals(run, 4))


def test_validation_logs_every_n_steps_and_changes_no_training_step(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    plain = train("run", "task_only", 0, "smoke", tmp_path / "plain", data_dir=str(control_data_dir))
    res = train("run", "task_only", 0, "smoke", tmp_path / "val", data_dir=str(control_data_dir),
                overrides={"validate_every": "10", "validate_goals": "2"})
    lines = _lines(tmp_path / "val" / "log.jsonl")
    val = [r for r in lines if r.get("event") == "validation"]
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    for r in val:
        assert r["eval/goals"] == 2 and r["eval/episodes_per_goal"] == 1
        assert math.isfinite(r[Metric.EVAL_NORMALIZED_REWARD]) and math.isfinite(r[Metric.EVAL_NORMALIZED_COST])
    # The training rows, the final weights and the final evaluation are those of the run without validation.
    assert [r for r in lines if "event" not in r] == _lines(tmp_path / "plain" / "log.jsonl")
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["learner"]["modules"]
    b = torch.load(tmp_path / "val" / "checkpoint.pt", weights_only=False)["learner"]["modules"]
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], rtol=0, atol=0)
    assert res["per_goal"] == plain["per_goal"]
    # The run record carries the curve and its verdict (4 points: tail of 3).
    v = res["validation"]
    assert [p[0] for p in v["points"]] == [10, 20, 30, 40] and v["tail_points"] == 3
    assert v["levelled_off"] in (True, False) and plain["validation"]["levelled_off"] is None
    # A checkpoint made without validation resumes with it: validation changes no training step.
    again = train("run", "task_only", 0, "smoke", tmp_path / "plain", data_dir=str(control_data_dir),
                  overrides={"validate_every": "10"})
    assert again["train"]["resumed_from"] == 40 and again["metrics"] == plain["metrics"]


@pytest.mark.parametrize("method", ["safe_cpl", "reward_model"])
def test_latent_learners_validate_in_stage_2_only_and_a_reward_model_never(method, smoke_dataset, tmp_path):
    ds = smoke_dataset("run")
    cfg = default_config(method, "run", "smoke", {"validate_every": "5"})
    spec = ARTEFACTS[method] if method == "reward_model" else get_method(method)
    learner = spec.learner(cfg, ds, 0)
    run_learner(learner, tmp_path)
    steps = [r["step"] for r in _lines(tmp_path / "log.jsonl") if r.get("event") == "validation"]
    if method == "reward_model":
        assert steps == []
    else:  # stage 1 is steps 1..20; stage 2 21..40
        assert steps == [25, 30, 35, 40]


# --------------------------------------------------------------------------- the table


def _run_file(out, method, seed, verdict):
    write_json(out / "runs" / f"run__{method}__seed{seed}.json", {
        "format": RUN_FORMAT, "task": "run", "method": method, "seed": seed, "scale": "smoke", "config": {},
        "data": {}, "command": "by hand",
        "metrics": {"eval/normalized_reward": 0.5, "eval/normalized_cost": 0.1, "eval/return_mean": 0.0,
                    "eval/cost_mean": 1.0},
        **({} if verdict == "absent" else {"validation": {"levelled_off": verdict}})})


def test_aggregate_marks_a_method_undertrained_when_a_seed_did_not_level_off(tmp_path):
    _run_file(tmp_path, "presa", 0, True)
    _run_file(tmp_path, "presa", 1, False)
    _run_file(tmp_path, "cpl", 0, True)
    _run_file(tmp_path, "cpl", 1, True)
    _run_file(tmp_path, "bc_safe", 0, "absent")
    # A run file without the field: the verdict is read from its log (a rising curve: not levelled off).
    log = tmp_path / "bc_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "event": "validation", Metric.EVAL_NORMALIZED_REWARD: 0.1 * s})
                           + "\n" for s in range(1, 9)))
    rec = json.loads((tmp_path / "runs" / "run__bc_safe__seed0.json").read_text())
    write_json(tmp_path / "runs" / "run__bc_safe__seed0.json", {**rec, "train": {"log": str(log)}})
    _run_file(tmp_path, "oracle", 0, None)
    table = aggregate(tmp_path, command="by hand", say=lambda s: None)
    rows = {(r["task"], r["method"]): r for r in table["rows"]}
    assert (rows[("run", "presa")]["undertrained"], rows[("run", "presa")]["n_not_levelled"]) == (True, 1)
    assert rows[("average", "presa")]["undertrained"] is True
    assert rows[("run", "cpl")]["undertrained"] is False and rows[("run", "cpl")]["n_validated"] == 2
    assert rows[("run", "bc_safe")]["undertrained"] is True
    assert rows[("run", "oracle")]["undertrained"] is None
    md = (tmp_path / "table.md").read_text()
    assert "| run | presa |" in md and "undertrained (1/2 not levelled off)" in md
    assert md.count("levelled off |") >= 2 and "| — |" in md
