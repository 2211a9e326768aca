"""python -m control suite: every method at smoke scale, resume after a real kill, Ray = local, the table, bad input.

* The whole method list runs through the suite in-process; the RC weights share one reward model;
  a second call skips everything; ``--aggregate`` writes the table.
* A run SIGKILLed midway restarts from its checkpoint and ends exactly as an uninterrupted run.
* ``--backend ray`` (a local Ray instance of 2 CPUs) gives the same table as the local process pool.
* The aggregate's normalisations against hand computations on written run files.
* Bad input: unknown task / method (valid ones listed), missing dataset (the build command),
  empty seed list, bad shard, unknown override, corrupted run file (named, redone).
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from control.__main__ import main
from control.learners import ARTEFACTS, METHODS
from control.suite import (
    RUN_FORMAT, TABLE_FIELDS, SuiteError, aggregate, next_jobs, parse_shard, plan_jobs,
                           read_run_file, run_suite, shard_jobs)
from llm_safepref.core.provenance import write_json

pytestmark = pytest.mark.control
ROOT = Path(__file__).resolve().parents[2]
RUN_RECORD_KEYS = {"command", "git_revision", "versions", "lock_sha256", "machine", "date"}


def _suite_args(out, work, data, *extra):
    return ["suite", "--tasks", "run", "--scale", "smoke", "--out", str(out), "--work_dir", str(work),
            "--data_dir", str(data), *extra]


def _cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------- planning


def test_plan_puts_artefacts_first_and_shards_whole_groups():
    jobs = plan_jobs(["run", "circle"], ["task_only", "rc_0.5", "rc_0.25"], [0, 1])
    keys = [j.key for j in jobs]
    assert keys[:4] == ["run__reward_model__seed0", "run__task_only__seed0", "run__rc_0.5__seed0",
                        "run__rc_0.25__seed0"]
    assert [j.deps for j in jobs[1:4]] == [(), ("run__reward_model__seed0",), ("run__reward_model__seed0",)]
    assert sum(j.kind == "artefact" for j in jobs) == 4  # one reward model per (task, seed), shared by both weights
    # Groups in order: (run,0) (run,1) (circle,0) (circle,1); shard 1/2 keeps groups 1 and 3.
    mine = shard_jobs(jobs, parse_shard("1/2"))
    assert {(j.task, j.seed) for j in mine} == {("run", 1), ("circle", 1)} and len(mine) == 8
    assert sorted(j.key for j in shard_jobs(jobs, (0, 2)) + mine) == sorted(keys)
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(SuiteError, match="--shard"):
            parse_shard(bad)


def test_the_local_pool_gets_one_job_per_idle_worker_so_groups_finish_in_order():
    """A simulation of the local backend's dispatch (``next_jobs``) with 2 workers over 2 groups: the
    first group's artefact-dependent runs go before the second group's independent ones (handing every
    ready job to the pool at once put them behind all of the second group), and a failed artefact's
    dependents are skipped."""
    jobs = plan_jobs(["run", "circle"], ["task_only", "oracle", "rc_0.5", "rc_0.25"], [0])
    keys = {j.key for j in jobs}
    pending, running, done, failed, order = list(jobs), [], set(), [], []
    while pending or running:
        submit, skipped = next_jobs(pending, done, failed, keys, 2 - len(running))
        assert not skipped
        for j in submit:
            pending.remove(j)
            running.append(j)
            order.append(j.key)
        assert 0 < len(running) <= 2
        done.add(running.pop(0).key)  # the oldest finishes first
    assert order == [j.key for j in jobs]  # here plan order exactly
    assert order.index("run__rc_0.25__seed0") < order.index("circle__task_only__seed0")
    # A failed artefact: its dependents are skipped, the others still run.
    rest = [j for j in jobs if j.key != "run__reward_model__seed0"]
    submit, skipped = next_jobs(rest, set(), ["run__reward_model__seed0"], keys, 2)
    assert {j.key for j in skipped} == {"run__rc_0.5__seed0", "run__rc_0.25__seed0"}
    assert [j.key for j in submit] == ["run__task_only__seed0", "run__oracle__seed0"]
    assert next_jobs(jobs, set(), [], keys, 0) == ([], [])


def test_plan_orders_artefacts_that_need_artefacts_and_plans_each_once(monkeypatch):
    # A registry entry whose artefact needs another one (the planner's graph; both RC reward models are real).
    base = ARTEFACTS["reward_model"]
    monkeypatch.setitem(ARTEFACTS, "encoder", dataclasses.replace(base, name="encoder", requires=("reward_model",)))
    monkeypatch.setitem(METHODS, "needs_encoder", dataclasses.replace(METHODS["rc_0.5"], name="needs_encoder",
                                                                      requires=("encoder", "reward_model")))
    jobs = plan_jobs(["run"], ["needs_encoder", "rc_0.25", "rc_0.5_imbalanced", "rc_0.25"], [3])
    assert [j.key for j in jobs] == ["run__reward_model__seed3", "run__encoder__seed3",
                                     "run__reward_model_imbalanced__seed3", "run__needs_encoder__seed3",
                                     "run__rc_0.25__seed3", "run__rc_0.5_imbalanced__seed3"]
    by = {j.key: j for j in jobs}
    assert by["run__encoder__seed3"].deps == ("run__reward_model__seed3",)
    assert by["run__needs_encoder__seed3"].deps == ("run__encoder__seed3", "run__reward_model__seed3")
    assert by["run__rc_0.5_imbalanced__seed3"].deps == ("run__reward_model_imbalanced__seed3",)
    for k, job in enumerate(jobs):  # every dependency comes earlier
        assert all(d in [j.key for j in jobs[:k]] for d in job.deps)
    monkeypatch.setitem(ARTEFACTS, "reward_model", dataclasses.replace(base, requires=("encoder",)))
    with pytest.raises(SuiteError, match="artefact dependency cycle: needs_encoder -> encoder -> reward_model "
                                         "-> encoder"):
        plan_jobs(["run"], ["needs_encoder"], [0])


# --------------------------------------------------------------------------- every method


def test_every_method_runs_through_the_suite_and_a_rerun_skips_them(smoke_dataset, control_data_dir, tmp_path,
                                                                     capsys):
    smoke_dataset("run")
    out, work = tmp_path / "out", tmp_path / "work"
    args = _suite_args(out, work, control_data_dir, "--methods", *METHODS, "--seeds", "0", "--aggregate")
    assert main(args) == 0
    printed = capsys.readouterr().out
    plan = plan_jobs(["run"], list(METHODS), [0])
    # One job per method plus PRESA's shared BC warm-up, the two reward models (balanced, imbalanced) and the shared
    # latent encoder, once each.
    assert len(plan) == len(METHODS) + 4 and [j.key for j in plan if j.kind == "artefact"] == \
        ["run__bc_warmup__seed0", "run__reward_model__seed0", "run__latent_encoder__seed0",
         "run__reward_model_imbalanced__seed0"]
    assert f"{len(plan)} jobs (0 done already)" in printed
    for method in METHODS:
        rec = read_run_file(out / "runs" / f"run__{method}__seed0.json")
        assert RUN_RECORD_KEYS <= set(rec) and rec["format"] == RUN_FORMAT
        assert rec["command"].startswith("python -m control suite --tasks run --scale smoke")
        assert rec["data"]["format"] == "control-data-2" and rec["data"]["scale"] == "smoke"
        assert rec["seconds"] > 0 and rec["config"]["threads"] == 1
        assert Path(rec["train"]["checkpoint"]).parent == work / "runs" / f"run__{method}__seed0"
    # One BC warm-up, trained once, is where PRESA, CPL-only and PRESA's threshold arms start.
    bcw = work / "artefacts" / "run__bc_warmup__seed0"
    for method in ("presa", "cpl", "presa_k0.5", "presa_k2"):
        rec = read_run_file(out / "runs" / f"run__{method}__seed0.json")
        assert rec["artefacts"] == {"bc_warmup": str(bcw)} and rec["info"]["bc_warmup"]["shared"] is True, method
    # One reward model, trained once, is the artefact of all three RC runs.
    rm = work / "artefacts" / "run__reward_model__seed0"
    assert {read_run_file(out / "runs" / f"run__rc_{w}__seed0.json")["artefacts"]["reward_model"]
            for w in ("0.25", "0.5", "0.75")} == {str(rm)}
    assert json.loads((out / "artefacts" / "run__reward_model__seed0.json").read_text())["kind"] == "reward_model"
    # The imbalance arm of RC reads its own, imbalanced reward model; the table lists the arms by name.
    imb = read_run_file(out / "runs" / "run__rc_0.5_imbalanced__seed0.json")
    assert imb["artefacts"] == {"reward_model_imbalanced": str(work / "artefacts" /
                                                               "run__reward_model_imbalanced__seed0")}
    assert imb["info"]["reward_model"]["crowd_config"]["user_weights"] == [4.0, 1.0]
    for arm in ("safe_cpl_imbalanced", "safe_vpl_imbalanced"):
        assert read_run_file(out / "runs" / f"run__{arm}__seed0.json")["config"]["user_weights"] == [4.0, 1.0]
    # Nothing of the work (checkpoints, logs) lies in the results folder.
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.jsonl"))
    table = json.loads((out / "table.json").read_text())
    assert RUN_RECORD_KEYS <= set(table) and table["command"] == "python -m control " + " ".join(args)
    assert {r["method"] for r in table["rows"]} == set(METHODS)
    oracle = [r for r in table["rows"] if r["method"] == "oracle" and r["task"] == "run"][0]
    assert oracle["normalized_reward"] == pytest.approx(1.0) and oracle["n_seeds"] == 1
    assert all(f in r and f + "_std" in r for r in table["rows"] for f in TABLE_FIELDS)
    md = (out / "table.md").read_text()
    assert "| run | presa |" in md and "| average | td3bc_lag |" in md
    # Every learner's step counts, from its runs' configs (smoke: control/learners/<method>.py).
    steps = table["learner_steps"]
    assert steps["presa"] == {"steps": 40, "bc_warmup_steps": 15} and steps["task_only"] == {"steps": 40}
    assert steps["safe_cpl"] == {"steps": 40, "stage1_steps": 20}
    assert steps["safe_vpl"] == {"steps": 60, "stage1_steps": 20, "policy_steps": 20}
    assert "presa 40 (bc_warmup_steps 15)" in md
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert main(args) == 0
    assert f"{len(plan)} jobs ({len(plan)} done already)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == mtimes
    # On a machine without the work folder (the artefacts' files gone) aggregating finished runs trains nothing ...
    shutil.rmtree(work / "artefacts")
    records = {p: p.read_bytes() for p in (out / "artefacts").iterdir()}
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{len(plan)} jobs ({len(plan) - 4} done already, 4 artefact(s) not needed" in printed and "0 of 0 jobs ran" in printed
    assert {p: p.read_bytes() for p in (out / "artefacts").iterdir()} == records
    assert not (work / "artefacts").exists()
    # ... and a missing run retrains just the artefact it reads.
    (out / "runs" / "run__rc_0.5__seed0.json").unlink()
    assert main(args) == 0
    assert "2 of 2 jobs ran" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "artefacts").iterdir()) == ["run__reward_model__seed0"]


# --------------------------------------------------------------------------- resume after a kill


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(smoke_dataset, control_data_dir,
                                                                                   tmp_path):
    smoke_dataset("run")
    steps = 2000
    extra = ("--methods", "task_only", "--seeds", "0", "--set", f"steps={steps}", "checkpoint_every=50",
             "log_every=50")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "control", *_suite_args(out, work, control_data_dir, *extra)]
    log = work / "runs" / "run__task_only__seed0" / "log.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    last = 0
    while time.time() < deadline and proc.poll() is None and last < 300:
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln.endswith("}")]
            last = json.loads(lines[-1])["step"] if lines else 0
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "runs" / "run__task_only__seed0.json").exists()
    killed_at = torch.load(work / "runs" / "run__task_only__seed0" / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < killed_at < steps
    resumed = _cli(*_suite_args(out, work, control_data_dir, *extra))
    assert f"resumed from step {killed_at}" in resumed.stdout
    rec = read_run_file(out / "runs" / "run__task_only__seed0.json")
    assert rec["train"]["resumed_from"] == killed_at
    # The same run without the kill: same metrics, same evaluation, same log.
    _cli(*_suite_args(tmp_path / "out2", tmp_path / "work2", control_data_dir, *extra))
    ref = read_run_file(tmp_path / "out2" / "runs" / "run__task_only__seed0.json")
    assert ref["train"]["resumed_from"] is None
    assert rec["metrics"] == ref["metrics"] and rec["per_goal"] == ref["per_goal"]

    def rows(path):
        return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "event" not in r]

    assert rows(rec["train"]["log"]) == rows(ref["train"]["log"])
    assert [r["step"] for r in rows(rec["train"]["log"])] == list(range(50, steps + 1, 50))


# --------------------------------------------------------------------------- Ray


def test_ray_backend_gives_the_local_backends_table(smoke_dataset, control_data_dir, tmp_path):
    pytest.importorskip("ray")
    smoke_dataset("run")
    extra = ("--methods", "presa", "task_only", "oracle", "rc_0.5", "--seeds", "0", "1", "--jobs", "2",
             "--aggregate")
    tables = {}
    for backend in ("local", "ray"):
        out = tmp_path / backend
        proc = _cli(*_suite_args(out, tmp_path / f"work_{backend}", control_data_dir, "--backend", backend, *extra))
        assert "12 of 12 jobs ran" in proc.stdout, proc.stdout[-2000:]  # 8 runs, 2 reward models, 2 BC warm-ups
        tables[backend] = json.loads((out / "table.json").read_text())
    assert tables["ray"]["rows"] == tables["local"]["rows"]
    assert len(tables["ray"]["rows"]) == 8 and tables["ray"]["seeds"] == [0, 1]


# --------------------------------------------------------------------------- the table by hand


def _write_run(out, task, method, seed, dsrl_reward, cost, kappa):
    write_json(out / "runs" / f"{task}__{method}__seed{seed}.json", {
        "format": RUN_FORMAT, "task": task, "method": method, "seed": seed, "scale": "smoke", "config": {},
        "data": {}, "command": "by hand",
        "metrics": {"eval/normalized_reward": dsrl_reward, "eval/normalized_cost": cost / kappa,
                    "eval/return_mean": 0.0, "eval/cost_mean": cost}})


def test_aggregate_normalisations_by_hand(tmp_path):
    # run (kappa 10): Oracle's DSRL reward 0.8 / 0.5; Task-only's cost 40 / 0.
    for seed, (o_r, t_c, p_r, p_c) in enumerate([(0.8, 40.0, 0.4, 2.0), (0.5, 0.0, 0.5, 1.0)]):
        _write_run(tmp_path, "run", "oracle", seed, o_r, 0.0, 10)
        _write_run(tmp_path, "run", "task_only", seed, 0.9, t_c, 10)
        _write_run(tmp_path, "run", "presa", seed, p_r, p_c, 10)
    # circle: one seed; Oracle 0.4, Task-only cost 5 (within kappa 10: C / kappa); PRESA 0.2, cost 1.
    _write_run(tmp_path, "circle", "oracle", 0, 0.4, 0.0, 10)
    _write_run(tmp_path, "circle", "task_only", 0, 0.9, 5.0, 10)
    _write_run(tmp_path, "circle", "presa", 0, 0.2, 1.0, 10)
    (tmp_path / "runs" / "circle__cpl__seed0.json").write_text("{not json")
    messages = []
    table = aggregate(tmp_path, command="by hand", say=messages.append)
    assert any("circle__cpl__seed0.json" in m for m in messages)
    rows = {(r["task"], r["method"]): r for r in table["rows"]}
    run = rows[("run", "presa")]
    # reward / Oracle's: 0.4 / 0.8 = 0.5 and 0.5 / 0.5 = 1 -> 0.75 ± sd(0.5, 1) = 0.35355.
    assert run["normalized_reward"] == pytest.approx(0.75) and run["normalized_reward_std"] == pytest.approx(math.sqrt(0.125))
    # cost / max(Task-only's, kappa 10): Task-only's 40 (unsafe) -> 2 / 40 = 0.05; Task-only's 0 (safe)
    # -> 1 / 10 = 0.1 -> 0.075 ± 0.035355.
    assert run["normalized_cost"] == pytest.approx(0.075) and run["normalized_cost_std"] == pytest.approx(math.sqrt(0.00125))
    assert run["dsrl_normalized_cost"] == pytest.approx(0.15) and run["n_seeds"] == 2
    circle = rows[("circle", "presa")]
    assert (circle["normalized_reward"], circle["normalized_cost"], circle["normalized_reward_std"]) == \
        pytest.approx((0.5, 0.1, 0.0))
    assert rows[("circle", "task_only")]["normalized_cost"] == pytest.approx(0.5)
    assert rows[("run", "task_only")]["normalized_cost"] == pytest.approx((1.0 + 0.0) / 2)
    # Average: per seed the mean over its tasks: seed 0 (0.5 + 0.5) / 2 = 0.5, seed 1 1.0 -> 0.75.
    avg = rows[("average", "presa")]
    assert avg["normalized_reward"] == pytest.approx(0.75) and avg["n_seeds"] == 2 and avg["n_tasks"] == 2
    assert avg["normalized_cost"] == pytest.approx(((0.05 + 0.1) / 2 + 0.1) / 2)
    assert rows[("run", "oracle")]["normalized_reward"] == pytest.approx(1.0)
    assert table["tasks"] == ["run", "circle"] and "| circle | presa | 0.500 ± 0.000 | 0.100 ± 0.000 |" in \
        (tmp_path / "table.md").read_text()


def test_issue_views_presa_table_and_plots_by_hand(tmp_path):
    """table.json's methods -> name -> tasks / average, the paper's row and goals; presa_table.json by hand."""
    from control.tables import PAPER_AVERAGE

    for seed in (0, 1):
        _write_run(tmp_path, "run", "oracle", seed, 0.8, 0.0, 10)
        _write_run(tmp_path, "run", "task_only", seed, 0.9, 20.0, 10)  # C / kappa = 2: unsafe
        _write_run(tmp_path, "run", "safe_cpl", seed, 0.76, 0.8, 10)  # reward 0.95, cost 0.04
        for w, (r, c) in {"0.25": (0.85, 10.0), "0.5": (0.7, 4.0), "0.75": (0.6, 2.0)}.items():
            _write_run(tmp_path, "run", f"rc_{w}", seed, r, c, 10)
        _write_run(tmp_path, "run", "rc_0.5_imbalanced", seed, 0.7, 8.0, 10)
        # PRESA at kappa x 0.5 / 1 / 2 with cost 6: safe only at x1 (6 <= 10) and x2; ground-truth baseline
        # cost 12: safe only at x2; CPL cost 4 (one run, judged at every threshold): safe at all three.
        for arm in ("presa_k0.5", "presa", "presa_k2"):
            _write_run(tmp_path, "run", arm, seed, 0.6, 6.0, 10)
        for arm in ("td3bc_lag_k0.5", "td3bc_lag", "td3bc_lag_k2"):
            _write_run(tmp_path, "run", arm, seed, 0.7, 12.0, 10)
        _write_run(tmp_path, "run", "cpl", seed, 0.5, 4.0, 10)
    table = aggregate(tmp_path, command="by hand", say=lambda m: None)
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(table["methods"]))
    cpl = saved["methods"]["safe_cpl"]
    assert set(cpl) == {"tasks", "average"} and cpl["tasks"]["run"]["n_seeds"] == 2
    assert cpl["tasks"]["run"]["normalized_reward"] == pytest.approx(0.95)
    assert cpl["average"]["normalized_cost"] == pytest.approx(0.04) and cpl["average"]["normalized_cost_std"] == 0
    assert all(f + "_std" in cpl["average"] for f in TABLE_FIELDS)
    assert saved["paper_average"] == PAPER_AVERAGE and saved["method_order"][0] == "presa"
    goals = saved["goals"]
    assert goals["safe_cpl_cost_at_most_0.05"] and goals["safe_cpl_reward_at_least_0.85"]
    assert goals["task_only_unsafe"] and goals["rc_worse_than_safe_cpl_on_frontier"]
    assert goals["rc_degrades_under_imbalance"] and goals["safe_cpl_imbalanced_cost_at_most_0.05"] is None
    pt = json.loads((tmp_path / "presa_table.json").read_text())
    assert pt["gt_cost_baseline"] == "td3bc_lag" and pt["thresholds"] == [0.5, 1.0, 2.0]
    assert pt["command"] == "by hand" and pt["missing"] == ["bc_safe_k0.5", "bc_safe", "bc_safe_k2"]
    presa, gt, cpl_only = pt["methods"]["presa"], pt["methods"]["td3bc_lag"], pt["methods"]["cpl"]
    assert presa["n_runs"] == 6 and presa["safe_fraction"] == pytest.approx(4 / 6)
    assert presa["by_threshold"]["0.5"]["safe_fraction"] == 0 and presa["by_threshold"]["2"]["safe_fraction"] == 1
    # Cost against each run's own threshold: 6/5, 6/10, 6/20.
    assert presa["dsrl_normalized_cost"] == pytest.approx((1.2 + 0.6 + 0.3) / 3)
    assert gt["safe_fraction"] == pytest.approx(2 / 6) and cpl_only["safe_fraction"] == 1 and cpl_only["n_runs"] == 6
    assert pt["goals"]["presa_safe_at_least_as_often_as_gt_cost_baseline"] is True
    assert pt["goals"]["presa_reward_above_bc_safe"] is None  # BC-safe did not run
    for png in ("reward_cost_frontier.png", "presa_safe_fraction.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "table.md").read_text()
    assert "## Average row against the paper" in md and "| safe_cpl | 0.950 ± 0.000 | 0.92 |" in md.replace("0.920", "0.92")
    assert "| presa | 0.667 [" in (tmp_path / "presa_table.md").read_text()


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_an_error_that_says_what_to_do(smoke_dataset, control_data_dir, tmp_path, capsys):
    smoke_dataset("run")
    out, work = tmp_path / "out", tmp_path / "work"

    def error(*args):
        assert main(["suite", "--out", str(out), "--work_dir", str(work), "--data_dir", str(control_data_dir),
                     *args]) == 2
        return capsys.readouterr().err

    assert "unknown task(s) walk; valid tasks: reach, run, circle, ant_vel" in error("--tasks", "walk")
    assert "unknown method(s) ppo; valid methods: presa, cpl, bc_safe, task_only" in \
        error("--tasks", "run", "--methods", "ppo")
    assert "empty seed list" in error("--tasks", "run", "--methods", "presa", "--seeds")
    assert "--shard i/n needs" in error("--tasks", "run", "--methods", "presa", "--shard", "3/2")
    assert "no config of presa, reward_model, reward_model_imbalanced, bc_warmup, latent_encoder has a field 'stepz'" in \
        error("--tasks", "run", "--methods", "presa", "--set", "stepz=3")
    empty = tmp_path / "no_data"
    err = error("--tasks", "run", "circle", "--methods", "presa", "--data_dir", str(empty))
    assert (f"build with: python -m control build-data --tasks circle run --scale smoke --seed 0 "
            f"--data_dir {empty}") in err
    assert not (out / "runs").exists()


def test_a_corrupted_run_file_is_named_and_redone(smoke_dataset, control_data_dir, tmp_path, capsys):
    smoke_dataset("run")
    out, work = tmp_path / "out", tmp_path / "work"
    args = _suite_args(out, work, control_data_dir, "--methods", "bc_safe", "--seeds", "0")
    assert main(args) == 0
    path = out / "runs" / "run__bc_safe__seed0.json"
    good = read_run_file(path)
    path.write_text(path.read_text()[:200])  # a half-written file
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"corrupted run file {path} (not readable JSON" in printed and "1 of 1 jobs ran" in printed
    assert (path.parent / (path.name + ".corrupt")).exists()
    assert read_run_file(path)["metrics"] == good["metrics"]  # redone (from its finished checkpoint)
    # A run file of another job in its place is corrupted too.
    path.write_text(json.dumps({**good, "seed": 5}))
    assert main(args) == 0
    assert "holds run ('run', 'bc_safe', 5)" in capsys.readouterr().out
    with pytest.raises(SuiteError, match="is a 'smoke' run and this suite is 'small'"):
        run_suite(["run"], ["bc_safe"], [0], "small", out, work_dir=work, data_dir=str(control_data_dir),
                  say=lambda s: None)


def test_data_builds_names_each_build_a_task_saw():
    from control.suite import _data_builds_text, data_builds
    a = {"created_utc": "2026-12-01T15:40:40Z", "git_revision": "9b162ce"}
    b = {"created_utc": "2026-12-01T22:12:26Z", "git_revision": "ac1b499"}
    runs = [{"task": "circle", "seed": 0, "data": a}, {"task": "circle", "seed": 0, "data": a},
            {"task": "circle", "seed": 1, "data": b}, {"task": "run", "seed": 0, "data": a}]
    builds = data_builds(runs)
    assert [e["seeds"] for e in builds["circle"]] == [[0], [1]]
    assert [e["n_runs"] for e in builds["circle"]] == [2, 1]
    assert len(builds["run"]) == 1
    text = _data_builds_text(builds)
    assert "circle: build 2026-12-01T15:40:40Z (seeds 0, 2 runs); build 2026-12-01T22:12:26Z (seeds 1, 1 runs)" in text
    assert "run:" not in text
    assert "one behaviour-data build" in _data_builds_text({"run": builds["run"]})
