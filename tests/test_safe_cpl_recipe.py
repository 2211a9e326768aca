"""recipes/safe_cpl_lora.py on the tiny model: defaults and flags, a user's own crowd file (stage 1
only, says what it skipped), stage 2 + the baselines on a small benchmark build, bad input refused
before training, publishing to the loopback Hub server, and 2 gloo processes matching 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "safe_cpl_lora.py"
TOKEN = "hf_test_token"


def crowd_file(path: Path, n_per_user: int = 10, users=("a", "b", "c")) -> Path:
    """Three users, each preferring answers that start with their own word."""
    words = {"a": "Sure", "b": "Briefly", "c": "Well"}
    rows = []
    for u in users:
        for i in range(n_per_user):
            mine = f"{words[u]}, here is answer {i} about topic {i % 4}."
            other = f"{words[users[(users.index(u) + 1) % len(users)]]}, answer {i} about topic {i % 4}."
            rows.append({"prompt": f"Question {i} on topic {i % 4}?", "chosen": mine, "rejected": other,
                         "user_id": u})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env(cache: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", LLM_SAFEPREF_CACHE=str(cache),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _args(model, data, out, steps: int = 2, batch: int = 4) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--learning_rate", "5e-3", "--save_steps", "2", "--max_length", "96",
            "--lora_r", "4", "--lora_alpha", "8", "--context_max", "4", "--encoder_hidden_size", "32",
            "--projection_hidden_size", "32", "--use_cpu", "true"]


def _run(cmd, env, timeout=400, ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_path):
    return tmp_path_factory.mktemp("cache")


def test_defaults_file_is_what_the_parser_returns_and_flags_override():
    from llm_safepref.recipes.defaults import config_path
    from llm_safepref.recipes.safe_cpl import SafeCPLRecipeRun

    defaults = yaml.safe_load(config_path("safe_cpl_lora").read_text())
    run = SafeCPLRecipeRun.parse([])
    values = {**vars(run.script_args), **vars(run.training_args), **vars(run.model_args)}
    for key, value in defaults.items():
        got = values[key]
        if key == "report_to":
            got = got if isinstance(got, str) else got[0] if got else "none"
        assert got == value, key
    run = SafeCPLRecipeRun.parse(["--num_candidates", "2", "--rc-weights", "0.1", "0.9", "--stage2_penalty", "0"])
    assert run.script_args.num_candidates == 2 and run.script_args.rc_weights == [0.1, 0.9]
    assert run.script_args.stage2_penalty == 0.0
    text = RECIPE.read_text()
    assert "sys.path" not in text and "run_safe_cpl_recipe(argv" in text


def test_recipe_answers_help():
    proc = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--num_candidates", "--stage2_penalty", "--downstream_task", "--user_column", "--latent_dim"):
        assert flag in proc.stdout, flag


def test_own_crowd_file_trains_stage1_and_says_what_it_skipped(tiny_model_path, tmp_path, cache):
    data = crowd_file(tmp_path / "my_crowd.jsonl")
    out = tmp_path / "D"
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, out)], _env(cache))
    assert "safe_cpl stage 1 finished: 2 steps" in proc.stdout
    assert "skipped: stage 2 and the baselines" in proc.stdout and "--downstream embedded" in proc.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "safe_cpl.json", "users.json", "README.md",
                 "downstream.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "downstream.json").read_text())
    assert record["global_step"] == 2 and record["downstream_benchmark"] is None and "methods" not in record
    assert record["command"] and record["date"] and record["skipped"]
    users = json.loads((out / "users.json").read_text())["users"]
    assert sorted(users) == ["a", "b", "c"]
    from llm_safepref.methods.safe_cpl import SafeCPLPolicy

    policy = SafeCPLPolicy.from_pretrained(out)
    assert len(policy.generate(["Question 1 on topic 1?"], user="a", max_new_tokens=4)) == 1


def test_bad_input_is_refused_before_training(tiny_model_path, tmp_path, cache):
    no_user = tmp_path / "no_user.jsonl"
    no_user.write_text(json.dumps({"prompt": "q?", "chosen": "a", "rejected": "b"}) + "\n")
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, no_user, tmp_path / "o1")], _env(cache),
                ok=False)
    assert proc.returncode == 2 and "user_column" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    renamed = tmp_path / "annotator.jsonl"
    rows = [json.loads(line) for line in crowd_file(tmp_path / "c.jsonl").read_text().splitlines()]
    renamed.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "user_id"},
                                           "annotator": r["user_id"]}) + "\n" for r in rows))
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, renamed, tmp_path / "o2"), "--user_column",
                 "annotator", "--context_max", "20"], _env(cache), ok=False)  # 10 pairs per user, sets of up to 20
    assert proc.returncode == 2 and "context_max" in proc.stderr, proc.stderr[-2000:]
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, crowd_file(tmp_path / "d.jsonl"),
                                                      tmp_path / "o3"), "--downstream", "embedded",
                 "--downstream_task", "nowhere_module:f"], _env(cache), ok=False)
    assert proc.returncode == 2 and "--downstream_task" in proc.stderr, proc.stderr[-2000:]
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, crowd_file(tmp_path / "e.jsonl"),
                                                      tmp_path / "o4"), "--downstream", "embedded",
                 "--stage2_prior", "mode"], _env(cache), ok=False)
    assert proc.returncode == 2 and "--stage2_prior" in proc.stderr, proc.stderr[-2000:]
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_stage2_and_baselines_on_a_benchmark_build(tiny_model_path, tmp_path, cache):
    """--downstream <built benchmark>: every method's row, with intervals, on the build's test prompts."""
    from tests.fixtures.small_benchmark import small_benchmark

    bench = small_benchmark(tiny_model_path)
    data = crowd_file(tmp_path / "crowd.jsonl")
    out = tmp_path / "run"
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, out), "--downstream", str(bench),
                 "--eval_limit_per_category", "3", "--num_candidates", "2", "--amortized_train_prompts", "4",
                 "--eval_max_new_tokens", "8", "--reward_model_steps", "20"], _env(cache), timeout=600)
    record = json.loads((out / "downstream.json").read_text())
    expected = {"task_only", "oracle", "rc_0.25", "rc_0.5", "rc_0.75", "safe_cpl_search", "safe_cpl_amortized"}
    assert set(record["methods"]) == expected
    for name, row in record["methods"].items():
        for field in ("normalized_reward", "normalized_cost", "over_refusal_rate", "task_reward", "harmful_rate"):
            assert f"{field}_ci" in row, (name, field)
        assert row["n_seeds"] == 1 and row["n_prompts"] == record["n_prompts"] > 0
    assert record["methods"]["oracle"]["normalized_reward"] == 1.0
    assert record["methods"]["oracle"]["harmful_rate"] <= record["methods"]["task_only"]["harmful_rate"]
    outcomes = record["outcomes"]["safe_cpl_search"]
    assert len(outcomes["prompt_ids"]) == record["n_prompts"] and all(c in (0, 1) for c in outcomes["choice"])
    assert record["rc_reward_model"]["train_pairs"] > 0 and record["amortized_policy"][0]["round"] == 1
    assert "safe_cpl_search" in proc.stdout and "normalized_reward" in proc.stdout
    assert (out / "downstream.md").is_file()
    assert record["base_candidates"]["source"] == "sampled" and Path(record["base_candidates"]["file"]).is_file()
    # A second run from the saved artefact (no training) reuses the base model's cached candidates.
    proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, tmp_path / "run2"), "--downstream",
                 str(bench), "--eval_limit_per_category", "3", "--num_candidates", "2", "--stage2_methods", "search",
                 "--baselines", "task_only", "oracle", "--eval_max_new_tokens", "8", "--stage1_artifact", str(out)],
                _env(cache), timeout=600)
    assert "base model's candidates: user-cache" in proc.stdout
    assert f"safe_cpl stage 1 loaded from {out}" in proc.stdout and "stage 1 finished" not in proc.stdout
    assert not (tmp_path / "run2" / "adapter_model.safetensors").exists()
    second = json.loads((tmp_path / "run2" / "downstream.json").read_text())
    assert second["outcomes"]["task_only"] == record["outcomes"]["task_only"]
    # The loaded artefact is the trained policy: the same search draws give the same candidates' choice.
    assert second["outcomes"]["safe_cpl_search"]["response"] == record["outcomes"]["safe_cpl_search"]["response"]
    assert set(second["methods"]) == {"task_only", "oracle", "safe_cpl_search"}
    assert second["stage2_prior"]["source"] == "learned"
    assert second["base_candidates"] == {**record["base_candidates"], "source": "user-cache"}
    # --stage2_prior users: stage 2 draws around the training users' posterior means (users.json); the base
    # candidates come from the package's shipped copy when this machine's cache has none (moved there for
    # the run: its key is the tiny model's, so no shipped entry of the defaults is touched).
    from llm_safepref.recipes.safe_cpl import BASE_CANDIDATES_DIR

    cached = Path(record["base_candidates"]["file"])
    shipped = BASE_CANDIDATES_DIR / cached.name
    assert not shipped.exists()
    cached.replace(shipped)
    try:
        proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, tmp_path / "run3"), "--downstream",
                     str(bench), "--eval_limit_per_category", "3", "--num_candidates", "2", "--stage2_methods",
                     "search", "--baselines", "task_only", "oracle", "--eval_max_new_tokens", "8",
                     "--stage1_artifact", str(out), "--stage2_prior", "users"], _env(cache), timeout=600)
    finally:
        shipped.replace(cached)
    third = json.loads((tmp_path / "run3" / "downstream.json").read_text())
    assert third["base_candidates"] == {**record["base_candidates"], "source": "shipped", "file": str(shipped)}
    assert third["outcomes"]["task_only"] == record["outcomes"]["task_only"]
    import numpy as np

    from llm_safepref.methods.safe_cpl.artifact import read_users

    users = read_users(out)

    z = np.array([v for _, v in sorted(users.items())], dtype=np.float32)
    assert third["stage2_prior"]["source"] == "users"
    np.testing.assert_allclose(third["stage2_prior"]["mu"], z.mean(0), atol=1e-4)
    np.testing.assert_allclose(third["stage2_prior"]["sigma"], np.maximum(z.std(0, ddof=1), 0.1), atol=1e-4)


@pytest.mark.slow
def test_push_to_hub_publishes_the_artefact(tiny_model_path, tmp_path, cache):
    from tests.hub_server import HubServer

    data = crowd_file(tmp_path / "crowd.jsonl")
    out = tmp_path / "run"
    with HubServer(tokens={TOKEN: "user"}) as hub:
        env = _env(cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf_home"))
        proc = _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, out), "--push_to_hub", "true",
                     "--hub_repo_id", "user/tiny-safe-cpl-recipe"], env)
        assert "Published" in proc.stdout
        stored = hub.files("user/tiny-safe-cpl-recipe")
        for name in ("adapter_model.safetensors", "safe_cpl.json", "users.json", "README.md"):
            assert name in stored, (name, sorted(stored))
    card = (out / "README.md").read_text()
    assert "user/tiny-safe-cpl-recipe" in card
    assert TOKEN not in (out / "downstream.json").read_text()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tiny_model_path, tmp_path, cache):
    """1 process x batch 4 vs 2 gloo processes x batch 2: the same final loss (1e-4) and the same users' z."""
    data = crowd_file(tmp_path / "crowd.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(RECIPE), *_args(tiny_model_path, data, one, steps=3, batch=4)], _env(cache))
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29561", str(RECIPE),
          *_args(tiny_model_path, data, two, steps=3, batch=2)], _env(cache), timeout=600)
    a = json.loads((one / "downstream.json").read_text())
    b = json.loads((two / "downstream.json").read_text())
    assert b["command"].startswith("accelerate launch") and a["global_step"] == b["global_step"] == 3
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-4)
    ua = json.loads((one / "users.json").read_text())["users"]
    ub = json.loads((two / "users.json").read_text())["users"]
    for user in ua:
        assert ub[user]["z"] == pytest.approx(ua[user]["z"], abs=1e-4), user


def test_shipped_base_candidates_are_keyed_by_the_recipe_defaults_at_two_threads():
    """The package's base samples are the ones the default recipe at 2 threads looks up: K judged samples of the
    base model for every default test prompt. Fails after a change of any key input (model, prompts,
    generation settings, judge, task, libraries): then re-ship (docs/safe_cpl.md, "Stage 2 and the table")."""
    import numpy as np

    from llm_safepref.judge import resolve_judge
    from llm_safepref.methods.safe_cpl.downstream import CandidateSet, load_downstream_prompts
    from llm_safepref.methods.safe_cpl.stage2 import resolve_task_reward
    from llm_safepref.models import load_model_and_tokenizer
    from llm_safepref.recipes.defaults import config_path
    from llm_safepref.recipes.safe_cpl import BASE_CANDIDATES_DIR, SafeCPLRecipeArguments, base_candidates_key

    d = yaml.safe_load(config_path("safe_cpl_lora").read_text())
    fields = SafeCPLRecipeArguments.__dataclass_fields__
    temperature, top_p = (d.get(n, fields[n].default) for n in ("sample_temperature", "sample_top_p"))
    model, _ = load_model_and_tokenizer(d["model_name_or_path"])
    prompts = load_downstream_prompts("embedded", d["eval_split"], limit_per_category=d["eval_limit_per_category"])
    key = base_candidates_key(model, prompts, k=d["num_candidates"], max_new_tokens=d["eval_max_new_tokens"],
                              temperature=temperature, top_p=top_p, batch_size=d["eval_batch_size"],
                              judge_version=resolve_judge(None).version,
                              task_reward=resolve_task_reward(d["downstream_task"]).name, threads=2)
    shipped = BASE_CANDIDATES_DIR / f"base-{key}.json"
    assert shipped.is_file(), f"no shipped base candidates for the defaults (key {key}); present: " + ", ".join(
        p.name for p in BASE_CANDIDATES_DIR.glob("base-*.json"))
    cands = CandidateSet.load(shipped)
    assert cands.meta["key"] == key and cands.n == len(prompts) and cands.k == d["num_candidates"]
    assert [p["id"] for p in cands.prompts] == [p["id"] for p in prompts]
    assert all(r.strip() for row in cands.responses for r in row)
    assert np.isfinite(np.asarray(cands.task_reward, dtype=float)).all()


def test_table_aggregates_seeds_and_says_when_their_decoding_differs(tmp_path):
    """scripts/safe_cpl_table.py --aggregate_only on the committed seed-0 main run and a copy of it posing as seed 1
    decoded the newer way: two seeds per trained row, one for the base-sample rows, and the difference named."""
    import importlib.util
    import shutil

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("safe_cpl_table", root / "scripts" / "safe_cpl_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(root / "results" / "safe_cpl_runs" / "main_seed0.json", runs / "main_seed0.json")
    rec = json.loads((runs / "main_seed0.json").read_text())
    assert table.decoding_of(rec) == {"candidate_batch_size": 16, "merged_adapter": False}
    rec["generation"].update(candidate_batch_size=32, candidates_merged_adapter=True)
    (runs / "main_seed1.json").write_text(json.dumps(rec))
    out = tmp_path / "table.json"
    table.main(["--seeds", "0", "1", "--runs_dir", str(runs), "--out", str(out), "--aggregate_only"])
    result = json.loads(out.read_text())
    assert result["methods"]["safe_cpl_search"]["n_seeds"] == 2 and result["methods"]["task_only"]["n_seeds"] == 1
    assert result["decoding"]["main_seed1"] == {"candidate_batch_size": 32, "merged_adapter": True}
    md = out.with_suffix(".md").read_text()
    assert "main_seed0: batches of 16, LoRA unmerged; main_seed1: batches of 32, LoRA merged" in md
    # The same decoding everywhere: nothing to say.
    rec["generation"] = json.loads((runs / "main_seed0.json").read_text())["generation"]
    (runs / "main_seed1.json").write_text(json.dumps(rec))
    table.main(["--seeds", "0", "1", "--runs_dir", str(runs), "--out", str(out), "--aggregate_only"])
    assert "decoded the trained models' candidates in different ways" not in out.with_suffix(".md").read_text()
