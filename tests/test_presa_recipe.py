"""The recipes: one source of defaults, argument parsing, ``--eval_benchmark``, a model without a
chat template, ``--help``, and end-to-end runs on the tiny model, in one process and in two gloo
CPU processes, including a new user's run on their own PKU-SafeRLHF file with no benchmark built."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.pairs import write_pairs

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PKU_SAMPLE = REPO / "tests" / "fixtures" / "pku_saferlhf_sample.jsonl"
NAMES = ("presa_lora", "dpo", "kto")


def _module(name: str):
    """recipes/<name>.py as a module (no sys.path edit: it imports only the installed package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(name: str, argv: list[str]):
    from llm_safepref.recipes import RecipeRun

    run = RecipeRun.parse(_module(name).RECIPE, argv)
    return run.script_args, run.training_args, run.model_args


# ----------------------------------------------------------------------------- defaults and flags


def test_recipes_hold_no_defaults_and_edit_no_sys_path():
    """The defaults exist once (the package's YAML files); the scripts import the package as installed."""
    for name in NAMES:
        text = (RECIPES / f"{name}.py").read_text()
        assert "sys.path" not in text and "DEFAULTS" not in text, name
        assert "run_recipe(RECIPE, argv)" in text, name
    assert not (RECIPES / "_recipe_common.py").exists() and not (RECIPES / "configs").exists()


@pytest.mark.parametrize("name", NAMES)
def test_defaults_file_is_what_the_parser_returns(name):
    """Every key of llm_safepref/recipes/configs/<name>.yaml is the parsed value with no argument."""
    from llm_safepref.recipes import config_path, load_defaults

    assert _module(name).RECIPE.defaults == name
    defaults = load_defaults(name)
    assert defaults == yaml.safe_load(config_path(name).read_text()) and len(defaults) > 20
    parsed = _parse(name, [])
    for key, value in defaults.items():
        holder = next(a for a in parsed if hasattr(a, key))
        got = getattr(holder, key)
        if key == "report_to":
            got = got if isinstance(got, str) else got[0] if got else "none"
        assert got == value, (name, key, got, value)


def test_presa_recipe_parses_with_no_arguments():
    from llm_safepref.recipes import load_defaults

    script, train, model = _parse("presa_lora", [])
    assert script.dataset_name == "embedded" and model.model_name_or_path == "embedded" and model.use_peft
    assert train.pref_loss == "cpl" and train.safety_delta == load_defaults("presa_lora")["safety_delta"]
    assert train.bf16 is False and train.gradient_checkpointing is False and not train.push_to_hub
    assert script.eval_benchmark == "auto" and not script.skip_eval
    # The command line overrides the defaults.
    _, train2, _ = _parse("presa_lora", ["--safety_delta", "0.9", "--pref_loss", "dpo", "--safety_ref_point", "kto"])
    assert train2.safety_delta == 0.9 and train2.pref_loss == "dpo" and train2.safety_ref_point_value == "kto"


def test_config_file_then_flags_override_the_defaults(tmp_path):
    """defaults < --config (only the keys it names) < flags; kebab-case and --config=PATH accepted."""
    config = tmp_path / "mine.yaml"
    config.write_text("safety_delta: 0.75\nmax_steps: 7\neval_benchmark: none\n")
    script, train, _ = _parse("presa_lora", ["--config", str(config)])
    assert (train.safety_delta, train.max_steps, script.eval_benchmark) == (0.75, 7, "none")
    assert train.nu_lr == 0.5 and train.learning_rate == 1.5e-4  # untouched keys keep the defaults
    script, train, _ = _parse("presa_lora", [f"--config={config}", "--max-steps", "9", "--eval-benchmark", "auto"])
    assert (train.safety_delta, train.max_steps, script.eval_benchmark) == (0.75, 9, "auto")
    bad = tmp_path / "bad.yaml"
    bad.write_text("safety_detla: 0.7\n")
    with pytest.raises(ValueError, match="safety_detla"):
        _parse("presa_lora", ["--config", str(bad)])


def test_dpo_and_kto_defaults_state_their_precision(tmp_path):
    """TRL's DPOConfig / KTOConfig default to bf16=True; the recipes' defaults set it off (as PRESA on a CPU)."""
    from trl import DPOConfig, KTOConfig

    for config_class in (DPOConfig, KTOConfig):
        assert config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is True
    for name in ("dpo", "kto"):
        _, train, _ = _parse(name, [])
        assert train.bf16 is False, name
        text = (REPO / "llm_safepref" / "recipes" / "configs" / f"{name}.yaml").read_text()
        assert "TRL's default is bf16: true" in text


def test_defaults_tool_lists_and_prints():
    out = subprocess.run([sys.executable, "-m", "llm_safepref.recipes"], capture_output=True, text=True, timeout=60,
                         cwd=REPO, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == sorted((*NAMES, "safe_cpl_lora"))
    from llm_safepref.recipes import config_path

    shown = subprocess.run([sys.executable, "-m", "llm_safepref.recipes", "kto"], capture_output=True, text=True,
                           timeout=60, cwd=REPO, check=True).stdout
    assert shown == config_path("kto").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_recipe_answers_help(name):
    proc = subprocess.run([sys.executable, str(RECIPES / f"{name}.py"), "--help"], env=_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_line = (RECIPES / f"{name}.py").read_text().split('"""')[1].splitlines()[0]
    assert first_line in proc.stdout
    assert "--eval_benchmark" in proc.stdout and "--skip_eval" in proc.stdout and "--config my.yaml" in proc.stdout
    assert f"llm_safepref/recipes/configs/{name}.yaml" in proc.stdout.replace("\n", "")


# ----------------------------------------------------------------------------- --eval_benchmark


def _script_args(**kwargs):
    from llm_safepref.recipes import RecipeArguments

    return RecipeArguments(**kwargs)


def test_eval_benchmark_resolution_without_a_build(tmp_path, monkeypatch):
    from llm_safepref.recipes import RecipeError, resolve_eval_benchmark

    monkeypatch.setenv("LLM_SAFEPREF_BENCHMARK_DIR", str(tmp_path / "no_benchmark"))
    # Own data under auto: no evaluation, and one message that says how to turn it on.
    plan = resolve_eval_benchmark(_script_args(dataset_name=str(PKU_SAMPLE)))
    assert plan.benchmark is None
    assert str(PKU_SAMPLE) in plan.message and "--eval_benchmark embedded" in plan.message
    assert "python -m llm_safepref.data build" in plan.message and "--eval_benchmark PATH" in plan.message
    # none, and --skip_eval as its alias (whatever --eval_benchmark says).
    assert resolve_eval_benchmark(_script_args(eval_benchmark="none")).benchmark is None
    plan = resolve_eval_benchmark(_script_args(eval_benchmark="embedded", skip_eval=True))
    assert plan.benchmark is None and plan.message is None
    # Asked for but not there: an error before anything runs, saying how to build it.
    for kwargs in ({"eval_benchmark": "embedded", "dataset_name": str(PKU_SAMPLE)}, {"dataset_name": "embedded"}):
        with pytest.raises(RecipeError, match=r"not built.*python -m llm_safepref.data build"):
            resolve_eval_benchmark(_script_args(**kwargs))
    with pytest.raises(RecipeError, match="no such folder"):
        resolve_eval_benchmark(_script_args(eval_benchmark=str(tmp_path / "nowhere")))
    (tmp_path / "half").mkdir()
    with pytest.raises(RecipeError, match="not a built benchmark folder"):
        resolve_eval_benchmark(_script_args(eval_benchmark=str(tmp_path / "half")))


def test_missing_benchmark_is_refused_before_training(tiny_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SAFEPREF_BENCHMARK_DIR", str(tmp_path / "no_benchmark"))
    out = tmp_path / "run"
    code = _module("dpo").main(["--model_name_or_path", str(tiny_model_path), "--dataset_name", str(PKU_SAMPLE),
                                "--output_dir", str(out), "--eval_benchmark", "embedded", "--use_cpu", "true"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: --eval_benchmark embedded (split 'test'): the embedded benchmark is not built")
    assert "python -m llm_safepref.data build" in errors[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- chat template


def _tiny_without_chat_template(tiny_model_path, folder: Path) -> Path:
    shutil.copytree(tiny_model_path, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return folder


def test_model_without_chat_template_is_a_clear_error(tiny_model_path, tmp_path, capsys):
    model = _tiny_without_chat_template(tiny_model_path, tmp_path / "plain")
    out = tmp_path / "run"
    code = _module("presa_lora").main(["--model_name_or_path", str(model), "--dataset_name", str(PKU_SAMPLE),
                                       "--output_dir", str(out), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the tokenizer of {model} has no chat template" in err and "--conversational true" in err
    assert "Pass --conversational false" in err and "a model whose tokenizer has a chat template" in err
    assert not out.exists()  # refused before anything trained or was written


def test_model_without_chat_template_trains_on_plain_text(tiny_model_path, tmp_path):
    model = _tiny_without_chat_template(tiny_model_path, tmp_path / "plain")
    out = tmp_path / "run"
    proc = _run([sys.executable, str(RECIPES / "presa_lora.py"), "--model_name_or_path", str(model),
                 "--dataset_name", str(PKU_SAMPLE), "--output_dir", str(out), "--max_steps", "1",
                 "--conversational", "false", "--eval_benchmark", "none", "--use_cpu", "true"])
    assert "presa run finished: 1 steps" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- end to end


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _recipe_args(model, data, out, batch) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--skip_eval", "true",
        "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--learning_rate", "5e-3",
        "--save_steps", "2", "--max_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true",
    ]


def _run(cmd: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_presa_recipe_end_to_end(tiny_model_path, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    proc = _run([sys.executable, str(RECIPES / "presa_lora.py"), *_recipe_args(tiny_model_path, data, out, 4)])
    assert "presa run finished: 3 steps" in proc.stdout
    assert "Safety evaluation skipped" not in proc.stdout  # --skip_eval: asked for, so no message
    for name in ("adapter_config.json", "adapter_model.safetensors", "lagrange.json", "run_metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "lagrange.json").is_file()
    metrics = json.loads((out / "run_metrics.json").read_text())
    nu = json.loads((out / "lagrange.json").read_text())
    assert metrics["global_step"] == 3 and len(metrics["nu_trajectory"]) == 3
    assert metrics["nu_trajectory"][-1][1] == pytest.approx(nu["value"])
    assert metrics["command"].startswith("python ") and metrics["date"] and metrics["machine"]
    # The run record of llm_safepref.core.provenance.
    from llm_safepref.core.provenance import lock_hash

    assert metrics["lock_sha256"] == lock_hash() and metrics["versions"]["trl"] == "1.16.0"
    assert metrics["git_revision"] and metrics["eval_benchmark"] is None and metrics["before"] is None
    # The defaults memoise the reference's sums (a LoRA policy on a local base model): every step counted.
    cache = metrics["reference_cache"]
    assert cache["enabled"] is True and cache["hits"] + cache["misses"] == 3 and len(cache["key"]) == 20
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), out)  # loads


@pytest.mark.parametrize("name, method", [("presa_lora", "presa"), ("dpo", "dpo"), ("kto", "kto")])
def test_new_user_own_data_trains_without_a_benchmark(name, method, tiny_model_path, tmp_path):
    """A PKU-SafeRLHF file, a local model, nothing built: trains, saves, says how to evaluate."""
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    env = _env(LLM_SAFEPREF_CACHE=str(empty), LLM_SAFEPREF_BENCHMARK_DIR=str(empty / "benchmark"))
    out = tmp_path / "D"
    proc = _run([sys.executable, str(RECIPES / f"{name}.py"), "--model_name_or_path", str(tiny_model_path),
                 "--dataset_name", str(PKU_SAMPLE), "--output_dir", str(out), "--max_steps", "2"], env=env)
    both = proc.stdout + proc.stderr
    assert both.count("Safety evaluation skipped") == 1, both[-3000:]
    assert "--eval_benchmark embedded" in both and "python -m llm_safepref.data build" in both
    assert f"{method} run finished: 2 steps" in proc.stdout
    for file in ("adapter_config.json", "adapter_model.safetensors", "run_metrics.json", "README.md"):
        assert (out / file).is_file(), file
    metrics = json.loads((out / "run_metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["before"] is None and metrics["after"] is None
    assert metrics["dataset"] == str(PKU_SAMPLE) and metrics["eval_benchmark"] is None
    # Nothing was built or converted on the way; PRESA's defaults memoise the reference's sums (a cache, not a build).
    assert {p.name for p in empty.iterdir()} == ({"reference_logps"} if method == "presa" else set())


@pytest.mark.slow
def test_recipe_evaluates_on_a_benchmark_folder(tiny_model_path, tmp_path):
    """--eval_benchmark PATH: the base and the trained adapter are evaluated on that build."""
    from tests.fixtures.small_benchmark import small_benchmark

    bench = small_benchmark(tiny_model_path)
    out = tmp_path / "run"
    proc = _run([sys.executable, str(RECIPES / "dpo.py"), "--model_name_or_path", str(tiny_model_path),
                 "--dataset_name", str(PKU_SAMPLE), "--output_dir", str(out), "--max_steps", "2",
                 "--eval_benchmark", str(bench), "--eval_limit", "6", "--eval_max_new_tokens", "8",
                 "--eval_limit_per_category", "4"], timeout=600)
    assert "Safety evaluation skipped" not in proc.stdout + proc.stderr
    metrics = json.loads((out / "run_metrics.json").read_text())
    assert metrics["eval_benchmark"] == str(bench)
    for side in ("before", "after"):
        assert metrics[side]["n_prompts"] == 6 and metrics[side]["generation"]["max_new_tokens"] == 8, side
    assert metrics["after"]["adapter"] == str(out)
    table = proc.stdout.split("dpo run finished: 2 steps", 1)[1]
    assert "harmful_compliance_rate" in table and "\nbase " in table and "\ndpo " in table
    card = (out / "README.md").read_text()
    assert "| base |" in card
    # The card carries the headline rates with their intervals, not every field of the evaluation.
    assert "harmful_compliance_rate (95% CI)" in card
    assert "judge_kind" not in card and " interval |" not in card
    assert metrics["hyperparameters"] is not None and metrics["before"]["judge_kind"] == "packaged"


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
    from llm_safepref.recipes import RecipeArguments, load_train_dataset

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
    script = RecipeArguments(dataset_name=str(path), conversational=True)
    ds = load_train_dataset(script, tokenizer=tok, max_length=128)
    assert ds[1]["chosen_is_safe"] is False and ds[0]["chosen_is_safe"] is True  # better = 1 is the unsafe one
    args = PresaConfig(output_dir=str(tmp_path / "o"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                       save_strategy="no", max_length=128, dataloader_pin_memory=False)
    trainer = PresaTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), args=args,
                           train_dataset=ds, processing_class=tok)
    trainer.train()
    assert trainer.multiplier.num_updates == 1


# ----------------------------------------------------------------------------- scripts/compare_methods.py


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_methods_on_the_recorded_runs(tmp_path):
    """The committed run files of results/runs give the committed comparison's figures."""
    compare = _compare_module()
    runs = {name: REPO / "results" / "runs" / f"{name}_lora.json" for name in ("presa", "dpo", "kto")}
    out = tmp_path / "cmp.json"
    assert compare.main([arg for name, path in runs.items() for arg in ("--run", f"{name}={path}")]
                        + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert key in result, key
    assert result["command"].startswith("python ") and "compare_methods.py --run presa=" in result["command"]
    rates = {name: (row["harmful_compliance_rate"], row["over_refusal_rate"], row["instruction_following_rate"])
             for name, row in result["methods"].items()}
    # results/presa_embedded.md: base 0.440 / 0.007 / 0.350, presa 0.170 / 0.069 / 0.390, ...
    assert {k: tuple(round(v, 3) for v in r) for k, r in rates.items()} == {
        "base": (0.44, 0.007, 0.35), "presa": (0.17, 0.069, 0.39), "dpo": (0.2, 0.09, 0.37), "kto": (0.03, 0.772, 0.23)}
    assert result["goal_met"]["presa"] == {"harmful_compliance_at_most_half_of_base": True,
                                           "over_refusal_at_most_base_plus_10_points": True,
                                           "instruction_following_at_least_base_minus_5_points": True}
    assert result["runs"]["presa"]["command"] == "accelerate launch recipes/presa_lora.py"
    table = out.with_suffix(".md").read_text()
    assert "| presa | 0.170 | 0.069 | 0.390 | `accelerate launch recipes/presa_lora.py` |" in table

    # Runs evaluated elsewhere, or not at all, are refused.
    other = json.loads(runs["dpo"].read_text())
    other["eval_benchmark"] = "/some/other/build"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="evaluated on '/some/other/build'"):
        compare.compare({"presa": runs["presa"], "dpo": tmp_path / "other.json"})
    other.update(eval_benchmark=None, before=None)
    (tmp_path / "none.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="no 'before' evaluation"):
        compare.compare({"presa": runs["presa"], "dpo": tmp_path / "none.json"})


# ----------------------------------------------------------------------------- evaluation set and base-eval cache


def _rows(counts: dict[str, int]) -> list[dict]:
    return [{"id": f"{c}-{i}", "category": c} for c, n in counts.items() for i in range(n)]


def test_eval_categories_select_and_cap_by_hand():
    """Named categories only, each with its own cap or the per-category one; ranked by sha256(id) as before."""
    import hashlib

    from llm_safepref.eval import parse_categories, select_categories

    rows = _rows({"harmful": 5, "benign": 3, "look_dangerous": 2, "contrast_harmful": 4})
    out = select_categories(rows, ["harmful:2", "look_dangerous:all", "benign"], per_category=1)
    assert [r["category"] for r in out] == ["harmful", "harmful", "look_dangerous", "look_dangerous", "benign"]
    smallest = sorted((f"harmful-{i}" for i in range(5)), key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:2]
    assert [r["id"] for r in out[:2]] == smallest
    # No cap anywhere: whole categories; a known category the build lacks selects nothing.
    assert len(select_categories(_rows({"harmful": 5, "benign": 3}), ["benign", "contrast_harmful"])) == 3
    assert parse_categories("harmful, look_dangerous:all") == {"harmful": "default", "look_dangerous": None}
    for bad, message in (("harmfull", "unknown category 'harmfull'"), ("harmful:0", "positive integer or 'all'"),
                         ("benign:x", "positive integer or 'all'")):
        with pytest.raises(ValueError, match=message):
            parse_categories([bad])
    with pytest.raises(ValueError, match="named twice"):
        parse_categories(["benign", "benign:3"])


def test_presa_default_evaluation_set_on_the_shipped_benchmark():
    """make train evaluates 100 harmful, 100 benign and all 109 look-dangerous test prompts; no contrast set."""
    from llm_safepref.data.adapters import load_eval_prompts
    from llm_safepref.eval import select_categories, stratified_subset

    script_args, _, _ = _parse("presa_lora", [])
    assert script_args.eval_categories == ["harmful", "benign", "look_dangerous:all"]
    assert script_args.eval_limit_per_category == 100 and script_args.eval_base_cache is True
    rows = [dict(r) for r in load_eval_prompts("embedded", script_args.eval_split)]
    chosen = stratified_subset(select_categories(rows, script_args.eval_categories,
                                                 script_args.eval_limit_per_category), script_args.eval_limit)
    counts = {c: sum(r["category"] == c for r in chosen) for c in ("harmful", "benign", "look_dangerous",
                                                                 "contrast_harmful")}
    assert counts == {"harmful": 100, "benign": 100, "look_dangerous": 109, "contrast_harmful": 0}
    # The same harmful and benign prompts as without the option (the v2 runs' subsets).
    old = stratified_subset(rows, None, per_category=100)
    assert {r["id"] for r in chosen if r["category"] != "look_dangerous"} == {
        r["id"] for r in old if r["category"] in ("harmful", "benign")}


def _base_args(bench, **kwargs):
    settings = dict(dataset_name=str(bench), eval_limit=6, eval_max_new_tokens=4, eval_batch_size=4,
                    eval_categories=["harmful", "benign", "look_dangerous:all"])
    return _script_args(**{**settings, **kwargs})


def test_base_eval_cache_hits_misses_and_says_so(tiny_model_path, tmp_path, monkeypatch):
    """A second evaluation with the same settings is read back (no generation), identical; a change misses."""
    import llm_safepref.eval as ev
    from llm_safepref.recipes import resolve_eval_benchmark
    from llm_safepref.recipes.evaluation import run_base_evaluation
    from tests.fixtures.small_benchmark import small_benchmark

    bench = small_benchmark(tiny_model_path)  # in the shared test cache: built once
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    args = _base_args(bench)
    plan = resolve_eval_benchmark(args)
    first, record = run_base_evaluation(plan, args, str(tiny_model_path))
    assert len(calls) == 1 and record["hit"] is False and record["source"] == "evaluated"
    stored = Path(record["file"])
    assert stored.parent == tmp_path / "cache" / "base_eval" and stored.name == f"{record['key']}.json"
    entry = json.loads(stored.read_text())
    for key in ("command", "git_revision", "versions", "machine", "date", "key_material", "result"):
        assert key in entry, key
    assert entry["key_material"]["torch_threads"] > 0 and entry["key_material"]["benchmark"]["eval_prompts_sha256"]

    second, hit = run_base_evaluation(plan, args, str(tiny_model_path))
    assert len(calls) == 1, "the second evaluation generated again"
    assert hit["hit"] is True and hit["source"] == "user-cache" and hit["file"] == str(stored)
    assert hit["key"] == record["key"] and hit["evaluated_by"]["date"] == entry["date"]
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)

    # Any setting the numbers depend on misses: here the generation length.
    _, other = run_base_evaluation(plan, _base_args(bench, eval_max_new_tokens=3), str(tiny_model_path))
    assert len(calls) == 2 and other["hit"] is False and other["key"] != record["key"]
    # Turned off: evaluates, stores nothing.
    _, off = run_base_evaluation(plan, _base_args(bench, eval_base_cache=False), str(tiny_model_path))
    assert len(calls) == 3 and off == {"hit": False, "source": "disabled", "reason": "--eval_base_cache false"}

    # The shipped copy is read when the user cache has none.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    stored.rename(shipped / stored.name)
    third, from_shipped = run_base_evaluation(plan, args, str(tiny_model_path), shipped_dir=shipped)
    assert len(calls) == 3 and from_shipped["source"] == "shipped" and from_shipped["file"] == str(shipped / stored.name)
    assert third == first
    # An entry whose recorded key material differs from the key's is not trusted.
    tampered = json.loads((shipped / stored.name).read_text())
    tampered["key_material"]["torch_threads"] += 1
    (shipped / stored.name).write_text(json.dumps(tampered))
    _, miss = run_base_evaluation(plan, args, str(tiny_model_path), shipped_dir=shipped)
    assert len(calls) == 4 and miss["source"] == "evaluated"


def test_base_eval_key_covers_every_input(tiny_model_path, tmp_path):
    """Each input of the key changes it: threads, seed, batch size, categories, judge audit, prompts, weights."""
    from llm_safepref.judge import load_judge
    from llm_safepref.recipes.base_eval import cache_key, key_material
    from tests.fixtures.small_benchmark import small_benchmark

    bench = small_benchmark(tiny_model_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    judge = load_judge()
    base = dict(model=str(model), benchmark=str(bench), split="test", limit=None, limit_per_category=100,
                categories=None, max_new_tokens=64, batch_size=16, seed=0, judge=judge, judge_audit=None, threads=2)

    def key(**change):
        record, reason = key_material(**{**base, **change})
        assert reason is None
        return cache_key(record)

    audit = tmp_path / "audit.json"
    audit.write_text("{}")
    reference = key()
    assert key() == reference  # deterministic
    changed = [key(threads=1), key(seed=1), key(batch_size=8), key(max_new_tokens=32), key(limit=10),
               key(limit_per_category=50), key(categories=["harmful"]), key(judge_audit=str(audit)), key(split="validation")]
    assert reference not in changed and len(set(changed)) == len(changed)
    # Any byte of the weights, and a local path that moved (no path is in the key).
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    assert key(model=str(moved)) == reference
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert key(model=str(moved)) != reference
    # A model that cannot be fingerprinted, and a callable judge, are not cached (and say why).
    record, reason = key_material(**{**base, "model": "nobody/not-a-cached-model"})
    assert record is None and "not-a-cached-model" in reason
    from llm_safepref.judge import resolve_judge

    plug_in = resolve_judge(f"{REPO / 'tests' / 'test_judge.py'}:length_judge")
    record, reason = key_material(**{**base, "judge": plug_in})
    assert record is None and "callable" in reason


def test_second_recipe_run_reads_the_base_evaluation_from_the_cache(tiny_model_path, tmp_path, monkeypatch, capsys):
    """Two tiny PRESA runs on a benchmark folder: the second's `before` is read back, identical, and says so."""
    import llm_safepref.eval as ev
    from tests.fixtures.small_benchmark import small_benchmark

    bench = small_benchmark(tiny_model_path)
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(k.get("adapter")) or real(*a, **k))
    metrics = []
    for run in ("first", "second"):
        out = tmp_path / run
        argv = [*_recipe_args(tiny_model_path, bench, out, 2), "--skip_eval", "false", "--max_steps", "1",
                "--eval_limit", "6", "--eval_max_new_tokens", "4", "--eval_batch_size", "4"]
        assert _module("presa_lora").main(argv) == 0
        metrics.append(json.loads((out / "run_metrics.json").read_text()))
    printed = capsys.readouterr().out
    # First run: base + trained evaluated; second run: only the trained one.
    assert calls == [None, str(tmp_path / "first"), str(tmp_path / "second")]
    first, second = (m["base_eval_cache"] for m in metrics)
    assert first["hit"] is False and first["source"] == "evaluated"
    assert second["hit"] is True and second["source"] == "user-cache" and second["file"] == first["file"]
    assert "Base evaluation: from the user-cache base-evaluation cache" in printed
    assert metrics[1]["before"] == metrics[0]["before"]
    assert metrics[0]["before"]["generation"]["categories"] == ["harmful", "benign", "look_dangerous:all"]
    assert "contrast_harmful" not in metrics[0]["before"]["n_by_category"]
    # --eval_base_only: the base rates, from the cache, and nothing trains.
    only = tmp_path / "only"
    argv = [*_recipe_args(tiny_model_path, bench, only, 2), "--skip_eval", "false", "--eval_limit", "6",
            "--eval_max_new_tokens", "4", "--eval_batch_size", "4", "--eval_base_only", "true"]
    assert _module("presa_lora").main(argv) == 0 and len(calls) == 3
    printed = capsys.readouterr().out
    assert "from the user-cache" in printed and "harmful_compliance_rate" in printed
    assert not (only / "adapter_model.safetensors").exists()
