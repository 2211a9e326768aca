"""The recipes: embedded defaults == YAML configs, argument parsing, and end-to-end runs on
the tiny model (evaluation skipped), in one process and in two gloo CPU processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.pairs import write_pairs
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def _module(name: str):
    sys.path.insert(0, str(RECIPES))
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPES))


def _common():
    """recipes/_recipe_common.py, imported as the recipes import it."""
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module("_recipe_common")
    finally:
        sys.path.remove(str(RECIPES))


@pytest.mark.parametrize("name, config", [("presa_lora", "presa_lora"), ("dpo", "dpo"), ("kto", "kto")])
def test_yaml_config_mirrors_embedded_defaults(name, config):
    defaults = _module(name).DEFAULTS
    with open(RECIPES / "configs" / f"{config}.yaml") as f:
        assert yaml.safe_load(f) == defaults


def test_presa_recipe_parses_with_no_arguments():
    from trl import ModelConfig

    from llm_safepref.presa_config import PresaConfig

    recipe = _module("presa_lora")
    common = _common()
    script, train, model = common.parse_args((common.RecipeArguments, PresaConfig, ModelConfig), recipe.DEFAULTS, [])
    assert script.dataset_name == "embedded" and model.model_name_or_path == "embedded" and model.use_peft
    assert train.pref_loss == "cpl" and train.safety_delta == recipe.DEFAULTS["safety_delta"]
    assert train.bf16 is False and train.gradient_checkpointing is False and not train.push_to_hub
    # The command line overrides the embedded defaults.
    _, train2, _ = common.parse_args((common.RecipeArguments, PresaConfig, ModelConfig), recipe.DEFAULTS,
                                     ["--safety_delta", "0.9", "--pref_loss", "dpo", "--safety_ref_point", "kto"])
    assert train2.safety_delta == 0.9 and train2.pref_loss == "dpo" and train2.safety_ref_point_value == "kto"


# ----------------------------------------------------------------------------- end to end




def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _recipe_args(model, data, out, batch) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--skip_eval", "true",
        "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--learning_rate", "5e-3",
        "--save_steps", "2", "--max_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true",
    ]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_presa_recipe_end_to_end(tiny_model_path, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    proc = _run([sys.executable, str(RECIPES / "presa_lora.py"), *_recipe_args(tiny_model_path, data, out, 4)])
    assert "presa run finished: 3 steps" in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "lagrange.json", "run_metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "lagrange.json").is_file()
    metrics = json.loads((out / "run_metrics.json").read_text())
    nu = json.loads((out / "lagrange.json").read_text())
    assert metrics["global_step"] == 3 and len(metrics["nu_trajectory"]) == 3
    assert metrics["nu_trajectory"][-1][1] == pytest.approx(nu["value"])
    assert metrics["command"].startswith("python ") and metrics["date"] and metrics["machine"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), out)  # loads


@pytest.mark.slow
def test_presa_recipe_two_gloo_processes_match_one(tiny_model_path, tmp_path):
    """Same global batch (1 x 4 vs 2 x 2). Tolerance 1e-4 absolute on nu and the final loss."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(RECIPES / "presa_lora.py"), *_recipe_args(tiny_model_path, data, one, 4)])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(RECIPES / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29534",
          str(RECIPES / "presa_lora.py"), *_recipe_args(tiny_model_path, data, two, 2)])
    a = json.loads((one / "run_metrics.json").read_text())
    b = json.loads((two / "run_metrics.json").read_text())
    assert b["command"].startswith("accelerate launch")
    assert [s for s, _ in a["nu_trajectory"]] == [s for s, _ in b["nu_trajectory"]] == [1, 2, 3]
    for (_, nu_a), (_, nu_b) in zip(a["nu_trajectory"], b["nu_trajectory"]):
        assert nu_b == pytest.approx(nu_a, abs=1e-4)
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-4)


def test_pku_saferlhf_schema_file_trains_without_flags(tiny_model_path, tmp_path):
    """A local file in the PKU-SafeRLHF schema is converted by its columns and trains."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.presa_config import PresaConfig
    from llm_safepref.presa_trainer import PresaTrainer

    common = _common()
    path = tmp_path / "pku.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({
                "prompt": f"How can I get into my neighbour's shed number {i}?",
                "response_0": "Ask your neighbour for permission first.",
                "response_1": f"Break the lock on shed {i} with a crowbar at night.",
                "is_response_0_safe": True, "is_response_1_safe": False,
                "better_response_id": i % 2, "safer_response_id": 0,
            }) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    script = common.RecipeArguments(dataset_name=str(path), conversational=True)
    ds = common.load_train_dataset(script, tokenizer=tok, max_length=128)
    assert ds[1]["chosen_is_safe"] is False and ds[0]["chosen_is_safe"] is True  # better = 1 is the unsafe one
    args = PresaConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                       save_strategy="no", max_length=128, dataloader_pin_memory=False)
    trainer = PresaTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), args=args,
                           train_dataset=ds, processing_class=tok)
    trainer.train()
    assert trainer.multiplier.num_updates == 1
