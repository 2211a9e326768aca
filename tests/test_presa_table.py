"""scripts/presa_table.py: DPO's learning-rate rule on validation and the units it plans (no training here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import presa_table  # noqa: E402

BASE = {"harmful_compliance_rate": 0.5, "over_refusal_rate": 0.02, "instruction_following_rate": 0.6}


def run(h, o, i):
    return {"before": dict(BASE), "after": {"harmful_compliance_rate": h, "over_refusal_rate": o,
                                            "instruction_following_rate": i}}


def test_choose_lr_keeps_the_side_goals_then_lowest_harm():
    # 3e-4 has the lowest harm but over-refuses (0.15 > 0.02 + 0.10): out; 2e-4 beats 1e-4 on harm.
    c = presa_table.choose_lr({1e-4: run(0.4, 0.05, 0.58), 2e-4: run(0.3, 0.08, 0.57), 3e-4: run(0.1, 0.15, 0.6)})
    assert c["chosen_learning_rate"] == 2e-4 and c["base"] == BASE
    rows = {r["learning_rate"]: r for r in c["candidates"]}
    assert rows[3e-4]["keeps_over_refusal_and_instruction_following"] is False and rows[2e-4]["goals_met"] == 2
    # Ties on harm go to the lower over-refusal, then the smaller rate.
    c = presa_table.choose_lr({1e-4: run(0.3, 0.05, 0.6), 2e-4: run(0.3, 0.04, 0.6), 3e-4: run(0.3, 0.04, 0.6)})
    assert c["chosen_learning_rate"] == 2e-4


def test_choose_lr_when_none_keeps_both_side_goals():
    # Instruction following below 0.55 everywhere: the rate meeting the most goals (3e-4: harm and over-refusal),
    # then the lowest harm (among 1e-4 and 1.5e-4, one goal each, 1.5e-4 would win).
    c = presa_table.choose_lr({1e-4: run(0.42, 0.05, 0.50), 1.5e-4: run(0.32, 0.08, 0.45), 3e-4: run(0.2, 0.1, 0.4)})
    assert c["chosen_learning_rate"] == 3e-4
    c = presa_table.choose_lr({1e-4: run(0.42, 0.05, 0.50), 1.5e-4: run(0.32, 0.08, 0.45)})
    assert c["chosen_learning_rate"] == 1.5e-4
    with pytest.raises(ValueError, match="no DPO validation run"):
        presa_table.choose_lr({})


def test_units_and_resume_plan(tmp_path):
    args = presa_table.build_parser().parse_args(["--seeds", "0", "1", "--runs_dir", str(tmp_path / "runs"),
                                                  "--outputs_dir", str(tmp_path / "out"), "--dpo_lrs", "1e-4",
                                                  "2e-4", "--", "--max_steps", "3"])
    table = presa_table.Table(args)
    assert table.presa_lr == 1.5e-4  # the PRESA defaults file's
    assert [u[0] for u in table.validation_units()] == ["dpo_val_lr0.0001", "dpo_val_lr0.0002"]
    assert all("--eval_split" in u[3] for u in table.validation_units())
    units = table.seed_units()
    assert [u[0] for u in units] == ["presa_seed0", "dpo_seed0", "kto_seed0", "presa_seed1", "dpo_seed1", "kto_seed1"]
    assert units[1][3] == ["--learning_rate", "0.00015"]
    cmd = table.command(*units[0])
    assert cmd[-2:] == ["--max_steps", "3"] and "--results_file" in cmd and "--resume_from_checkpoint" not in cmd
    # A checkpoint in the unit's folder: the command resumes from it.
    (tmp_path / "out" / "presa_seed0" / "checkpoint-20").mkdir(parents=True)
    assert table.command(*units[0])[-2:] == ["--resume_from_checkpoint", str(tmp_path / "out" / "presa_seed0" /
                                                                              "checkpoint-20")]
    # The choice is written only once every validation unit has run; the best rate's units follow it.
    assert table.choice() is None
    for lr, r in ((1e-4, run(0.4, 0.05, 0.58)), (2e-4, run(0.3, 0.08, 0.57))):
        (tmp_path / "runs" / f"dpo_val_lr{lr:g}.json").write_text(json.dumps(r))
    choice = table.choice()
    assert choice["chosen_learning_rate"] == 2e-4 and (tmp_path / "runs" / "dpo_lr_choice.json").is_file()
    assert [u[0] for u in table.best_units(choice)] == ["dpo_best_seed0", "dpo_best_seed1"]
    assert table.best_units({"chosen_learning_rate": 1.5e-4}) == []  # PRESA's rate: the dpo seeds are that row


def test_best_rate_units_start_while_seed_units_still_run(tmp_path, monkeypatch):
    """No phase barrier: with 2 workers, a best-rate unit starts while the last seed unit is still running
    (the old two-pool plan waited for every seed unit first, and would time out here)."""
    import threading

    args = presa_table.build_parser().parse_args(["--seeds", "0", "--runs_dir", str(tmp_path / "runs"),
                                                  "--outputs_dir", str(tmp_path / "out"), "--dpo_lrs", "1e-4",
                                                  "2e-4", "--jobs", "2"])
    table = presa_table.Table(args)
    best_started = threading.Event()
    order = []

    def fake_run_unit(unit, recipe, seed, flags):
        order.append(unit)
        if unit.startswith("dpo_val_lr"):
            lr = float(flags[1])
            r = run(0.4, 0.05, 0.58) if lr == 1e-4 else run(0.3, 0.08, 0.57)
            (tmp_path / "runs" / f"{unit}.json").write_text(json.dumps(r))
        elif unit.startswith("dpo_best"):
            best_started.set()
        elif unit == "kto_seed0":
            assert best_started.wait(timeout=10), "the best-rate unit waited for the seed units"
        return tmp_path / "runs" / f"{unit}.json"

    monkeypatch.setattr(table, "run_unit", fake_run_unit)
    table.run()
    assert order[:2] == ["dpo_val_lr0.0001", "dpo_val_lr0.0002"]
    assert set(order) == {"dpo_val_lr0.0001", "dpo_val_lr0.0002", "presa_seed0", "dpo_seed0", "kto_seed0",
                          "dpo_best_seed0"}
