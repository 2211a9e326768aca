"""Faults and scale-out: SIGKILL + resume, and two gloo CPU processes vs one process.

Both run a small training script (written below into tmp_path) in subprocesses on the tiny
model, so a real process is killed and a real ``accelerate launch`` starts two ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    '''
    """Train PresaTrainer (LoRA) on the tiny model; write result.json. Args: JSON of options."""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from llm_safepref.presa_config import PresaConfig
    from llm_safepref.presa_trainer import PresaTrainer

    opts = json.loads(sys.argv[1])
    rows = []
    for i in range(opts["rows"]):
        rows.append(dict(
            prompt=f"How do I do task number {i} at home?",
            chosen=(f"I can't help with task {i}." if i % 2 == 0 else f"Sure: step one of task {i}."),
            rejected=f"Here is how: mix the parts for task {i}, then heat them.",
            chosen_is_safe=True, rejected_is_safe=(i % 4 == 1)))

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                print(f"STEP {state.global_step}", flush=True)
            time.sleep(opts.get("sleep", 0.0))

    path = opts["model"]
    args = PresaConfig(
        output_dir=opts["output_dir"], max_steps=opts["max_steps"],
        per_device_train_batch_size=opts["batch"], learning_rate=5e-3, report_to="none",
        save_strategy="steps", save_steps=opts.get("save_steps", 1000), seed=0, max_length=128,
        safety_delta=0.8, nu_lr=0.5, dataloader_pin_memory=False, use_cpu=True,
        lr_scheduler_type="constant",
    )
    trainer = PresaTrainer(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        callbacks=[Progress()],
    )
    trainer.train(resume_from_checkpoint=opts.get("resume"))
    nus = torch.tensor([trainer.nu], dtype=torch.float64)
    all_nus = trainer.accelerator.gather(nus).tolist()  # nu of every rank
    if trainer.accelerator.is_main_process:
        logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        with open(os.path.join(opts["output_dir"], "result.json"), "w") as f:
            json.dump({"nu": trainer.nu, "rank_nus": all_nus, "logs": logs,
                       "world_size": trainer.accelerator.num_processes,
                       "restore_callback_states": args.restore_callback_states_from_checkpoint}, f)
    # Tear the process group down before the interpreter exits: left to exit, gloo's threads can abort a rank
    # ("terminate called without an active exception", exit -6) after training has finished (seen once in CI).
    trainer.accelerator.wait_for_everyone()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    '''
)


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "presa_child.py"
    script.write_text(CHILD)
    return script


def _run(cmd: list[str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


KILL_BASE = {"rows": 24, "batch": 4, "max_steps": 8, "save_steps": 2}


@pytest.fixture(scope="module")
def straight_run(tiny_model_path, tmp_path_factory) -> dict:
    """The uninterrupted 8-step run the killed-and-resumed runs are compared with."""
    tmp = tmp_path_factory.mktemp("straight")
    straight = tmp / "straight"
    _run([sys.executable, str(_script(tmp)), json.dumps({**KILL_BASE, "model": str(tiny_model_path),
                                                         "output_dir": str(straight)})])
    return _result(straight)


def _run_and_kill_after_step_5(script: Path, opts: dict) -> None:
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(opts)], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "STEP 5":  # checkpoint-4 is on disk, step 6's is not: kill mid-run
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tiny_model_path, tmp_path, straight_run):
    """Tolerance: nu and the final loss agree to 1e-5 absolute (same ops, same order, CPU)."""
    script = _script(tmp_path)
    base = {"model": str(tiny_model_path), **KILL_BASE}

    killed = tmp_path / "killed"
    opts = {**base, "output_dir": str(killed), "sleep": 0.5}
    _run_and_kill_after_step_5(script, opts)
    assert (killed / "checkpoint-4" / "lagrange.json").is_file()
    assert not (killed / "checkpoint-6").exists() and not (killed / "result.json").exists()

    _run([sys.executable, str(script), json.dumps({**opts, "sleep": 0.0, "resume": True})])
    a, b = straight_run, _result(killed)
    assert b["logs"][-1]["step"] == a["logs"][-1]["step"] == 8
    assert b["nu"] == pytest.approx(a["nu"], abs=1e-5)
    assert b["logs"][-1]["loss"] == pytest.approx(a["logs"][-1]["loss"], abs=1e-5)
    # The resumed steps 5..8 follow the uninterrupted ones step by step.
    tail_a = {e["step"]: e for e in a["logs"] if e["step"] > 4}
    for e in b["logs"]:
        if e["step"] > 4:
            assert e["loss"] == pytest.approx(tail_a[e["step"]]["loss"], abs=1e-5)
            assert e["lagrange/nu"] == pytest.approx(tail_a[e["step"]]["lagrange/nu"], abs=1e-5)


@pytest.mark.slow
def test_sigkill_and_resume_default_args_restores_nu_from_trainer_state(tiny_model_path, tmp_path, straight_run):
    """Default settings (restore_callback_states_from_checkpoint=False) and every lagrange.json
    deleted after the kill: nu comes back from the checkpoint's trainer_state.json (transformers'
    callback state) alone, and equals nu of the uninterrupted run, step by step (1e-5 absolute)."""
    script = _script(tmp_path)
    killed = tmp_path / "killed"
    opts = {"model": str(tiny_model_path), **KILL_BASE, "output_dir": str(killed), "sleep": 0.5}
    _run_and_kill_after_step_5(script, opts)
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LagrangeCallback"]["attributes"]["multiplier_state"]
    nu_at_4 = {e["step"]: e for e in straight_run["logs"]}[4]["lagrange/nu"]
    assert saved["num_updates"] == 4 and saved["value"] == pytest.approx(nu_at_4, abs=1e-5)
    for path in killed.rglob("lagrange.json"):
        path.unlink()

    _run([sys.executable, str(script), json.dumps({**opts, "sleep": 0.0, "resume": True})])
    a, b = straight_run, _result(killed)
    assert b["restore_callback_states"] is False
    assert b["logs"][-1]["step"] == 8
    assert b["nu"] == pytest.approx(a["nu"], abs=1e-5)
    tail_a = {e["step"]: e for e in a["logs"] if e["step"] > 4}
    resumed = [e for e in b["logs"] if e["step"] > 4]
    assert [e["step"] for e in resumed] == [5, 6, 7, 8]
    for e in resumed:
        assert e["lagrange/nu"] == pytest.approx(tail_a[e["step"]]["lagrange/nu"], abs=1e-5)
        assert e["loss"] == pytest.approx(tail_a[e["step"]]["loss"], abs=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_model_path, tmp_path):
    """2 CPU ranks x batch 2 vs 1 rank x batch 4 (same global batch). Tolerance 1e-4 absolute on
    the loss and on nu: the ranks pad to their own longest sequence, and gradients are averaged
    by all-reduce instead of one mean, so float round-off differs slightly."""
    script = _script(tmp_path)
    base = {"model": str(tiny_model_path), "rows": 16, "max_steps": 4}
    one = tmp_path / "one"
    _run([sys.executable, str(script), json.dumps({**base, "batch": 4, "output_dir": str(one)})])
    two = tmp_path / "two"
    _run([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29533",
        str(script), json.dumps({**base, "batch": 2, "output_dir": str(two)}),
    ], timeout=300)
    a, b = _result(one), _result(two)
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["rank_nus"][0] == b["rank_nus"][1]  # every rank holds the same nu, bit for bit
    assert len(a["logs"]) == len(b["logs"]) == 4
    for ea, eb in zip(a["logs"], b["logs"]):
        assert eb["loss"] == pytest.approx(ea["loss"], abs=1e-4)
        assert eb["lagrange/nu"] == pytest.approx(ea["lagrange/nu"], abs=1e-4)
        assert eb["safety/prob_mean"] == pytest.approx(ea["safety/prob_mean"], abs=1e-4)
    assert b["nu"] == pytest.approx(a["nu"], abs=1e-4)
