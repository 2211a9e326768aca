"""Publishing end to end against a real HTTP Hub server on 127.0.0.1 (tests/hub_server.py).

A real LoRA adapter (peft, tiny Llama) is published with ``publish_adapter`` / the CLI and
loaded back with ``PeftModel.from_pretrained(base, repo_id)`` in a subprocess whose
``HF_HUB_OFFLINE=0`` and ``HF_ENDPOINT`` point at the server (huggingface_hub reads both at
import time, so the subprocess is what makes the download side honest). In this process the
offline switch is lifted only through ``monkeypatch`` on ``huggingface_hub.constants``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_safepref.publish import PublishError, hub_base_model_id, publish_adapter, write_model_card
from tests.hub_server import HubServer

TOKEN = "hf_test_token"
REPO_ROOT = Path(__file__).resolve().parents[1]

EVAL_TABLE = {
    "base": {"harmful_compliance": 0.62, "over_refusal": 0.08, "instruction_following": 0.71},
    "presa": {"harmful_compliance": 0.25, "over_refusal": 0.12, "instruction_following": 0.69},
}
NU = [(step, 0.05 * step) for step in range(0, 60)]


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file: the 'byte-identical' check."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path, tmp_path_factory) -> Path:
    """A real peft LoRA adapter on the tiny model, with non-zero B so it changes the output,
    a model card, and a training leftover (checkpoint folder) that must not be uploaded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    write_model_card(
        folder,
        base_model=str(tiny_model_path),
        method="presa",
        dataset="embedded",
        hyperparameters={"learning_rate": 1e-4, "lora_r": 4, "delta": 0.9, "nu_lr": 0.05},
        eval_table=EVAL_TABLE,
        nu_trajectory=NU,
        repo_id="user/tiny-presa",
    )
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"not for the hub")
    return folder


@pytest.fixture
def hub(monkeypatch):
    """A fresh server; this process may talk to it (offline switch lifted, no xet)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with HubServer(tokens={TOKEN: "user"}) as server:
        yield server


def _subprocess_env(hub: HubServer, tmp_path: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"),  # fresh cache, no saved token
        HF_TOKEN=TOKEN,
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


_LOAD_SCRIPT = r"""
import json, sys
import torch
from huggingface_hub import constants
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_path, repo_id, local_dir = sys.argv[1:4]
assert not constants.HF_HUB_OFFLINE
torch.manual_seed(0)
plain = AutoModelForCausalLM.from_pretrained(base_path)
ids = torch.randint(0, plain.config.vocab_size, (1, 12))
with torch.no_grad():
    base_logits = plain(ids).logits
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), repo_id)
remote = get_peft_model_state_dict(model)
local = load_file(f"{local_dir}/adapter_model.safetensors")
with torch.no_grad():
    adapted_logits = model(ids).logits
print(json.dumps({
    "same_keys": sorted(remote) == sorted(local),
    "n_tensors": len(local),
    "equal": all(torch.equal(remote[k], local[k]) for k in local if k in remote),
    "output_changed": not torch.allclose(base_logits, adapted_logits),
    "cache_files": sorted(p.name for p in __import__("pathlib").Path(constants.HF_HUB_CACHE).rglob("adapter_*")),
}))
"""


def test_publish_then_load_from_hub(adapter_dir, hub, tiny_model_path, tmp_path, monkeypatch):
    before = _snapshot(adapter_dir)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # endpoint from the environment, read at call time

    commit_url = publish_adapter(adapter_dir, "user/tiny-presa", token=TOKEN, private=True)

    repo = hub.repos["user/tiny-presa"]
    assert repo.private
    assert commit_url == f"{hub.url}/user/tiny-presa/commit/{repo.branches['main']}"
    remote = hub.files("user/tiny-presa")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "nu_trajectory.json"):
        assert remote[name] == (adapter_dir / name).read_bytes(), name
    assert not any(p.startswith("checkpoint-") for p in remote), sorted(remote)
    assert ("POST", "/api/models/user/tiny-presa/commit/main") in hub.requests
    assert _snapshot(adapter_dir) == before

    # Download side: a fresh process and cache, online against the server only.
    n_before = len(hub.requests)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(tiny_model_path), "user/tiny-presa", str(adapter_dir)],
        env=_subprocess_env(hub, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["n_tensors"] == 8  # 2 layers x (q, v) x (A, B)
    assert loaded["same_keys"] and loaded["equal"], loaded
    assert loaded["output_changed"], "the adapter loaded from the Hub did not change the model's output"
    assert loaded["cache_files"] == ["adapter_config.json", "adapter_model.safetensors"], loaded
    served = hub.requests[n_before:]
    assert ("GET", "/user/tiny-presa/resolve/main/adapter_model.safetensors") in served


def test_republish_and_branch(adapter_dir, hub, tmp_path):
    import shutil

    first = publish_adapter(adapter_dir, "user/again", token=TOKEN, endpoint=hub.url)
    repo = hub.repos["user/again"]
    assert first.endswith(repo.branches["main"])
    # Same files again: like the Hub, no empty commit; the head's url comes back.
    assert publish_adapter(adapter_dir, "user/again", token=TOKEN, endpoint=hub.url) == first
    second = publish_adapter(adapter_dir, "tiny-presa-2", token=TOKEN, endpoint=hub.url)  # bare name -> user/
    assert second.startswith(f"{hub.url}/user/tiny-presa-2/commit/")

    # A changed card to a new branch: one commit on "dev", main untouched.
    copy = shutil.copytree(adapter_dir, tmp_path / "copy")
    write_model_card(copy, base_model="embedded", method="presa", dataset="embedded",
                     hyperparameters={"seed": 1}, eval_table=None, nu_trajectory=None)
    dev = publish_adapter(copy, "user/again", token=TOKEN, endpoint=hub.url, revision="dev", commit_message="dev build")
    assert dev.endswith(repo.branches["dev"]) and repo.branches["main"] != repo.branches["dev"]
    assert first.endswith(repo.branches["main"])
    assert repo.commits[repo.branches["dev"]].summary == "dev build"
    assert hub.files("user/again", "dev")["README.md"] == (copy / "README.md").read_bytes()
    assert hub.files("user/again", "main")["README.md"] == (adapter_dir / "README.md").read_bytes()


@pytest.mark.parametrize("failure", ["commit_500", "token_401"])
def test_failed_publish_raises_clear_error_and_keeps_adapter(adapter_dir, hub, failure):
    before = _snapshot(adapter_dir)
    if failure == "commit_500":
        hub.fail_commit_status = 500
    else:
        hub.reject_tokens = True
    with pytest.raises(PublishError) as info:
        publish_adapter(adapter_dir, "user/broken", token=TOKEN, endpoint=hub.url)
    message = str(info.value)
    assert "user/broken" in message and hub.url in message
    assert f"still at {adapter_dir.resolve()}" in message
    if failure == "commit_500":
        assert "uploading" in message and "500" in message
        assert hub.repos["user/broken"].commits[hub.repos["user/broken"].branches["main"]].summary == "initial commit"
    else:
        assert "401" in message and "token" in message
        assert "user/broken" not in hub.repos
    assert _snapshot(adapter_dir) == before


def test_cli_publish_and_failure(adapter_dir, hub, tmp_path):
    before = _snapshot(adapter_dir)
    cmd = [sys.executable, "-m", "llm_safepref.publish", str(adapter_dir), "user/cli-adapter", "--private", "--endpoint", hub.url]
    ok = subprocess.run(cmd, env=_subprocess_env(hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9"), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.strip() == f"{hub.url}/user/cli-adapter/commit/{hub.repos['user/cli-adapter'].branches['main']}"
    assert hub.repos["user/cli-adapter"].private

    hub.fail_commit_status = 500
    cmd[4] = "user/cli-broken"
    bad = subprocess.run(cmd, env=_subprocess_env(hub, tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: Publishing failed while uploading the adapter for repo 'user/cli-broken'")
    assert f"still at {adapter_dir.resolve()}" in bad.stderr
    assert _snapshot(adapter_dir) == before


def test_refuses_before_any_request(adapter_dir, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    (not_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(PublishError, match=r"missing adapter_model\.safetensors"):
        publish_adapter(not_adapter, "user/x", token=TOKEN, endpoint=hub.url)
    with pytest.raises(PublishError, match="is not a folder"):
        publish_adapter(tmp_path / "nowhere", "user/x", token=TOKEN, endpoint=hub.url)

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(PublishError, match="no Hugging Face token"):
        publish_adapter(adapter_dir, "user/x", endpoint=hub.url)

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish_adapter(adapter_dir, "user/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_model_card(adapter_dir, tmp_path):
    from huggingface_hub import ModelCard

    text = (adapter_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"trl", "presa", "safety", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local path is not a Hub id
    assert "datasets" not in meta  # "embedded" is not a Hub id
    assert ModelCard.load(adapter_dir / "README.md").data.to_dict()["library_name"] == "peft"
    for section in ("## Base model", "## Method", "## Training data", "## Hyperparameters",
                    "## Evaluation (before / after)", "## Lagrange multiplier ν", "## How to load"):
        assert section in text, section
    assert "| base | 0.62 | 0.08 | 0.71 |" in text
    assert "| change (presa − base) | -0.37 | 0.04 | -0.02 |" in text
    assert "| learning_rate | 0.0001 |" in text
    assert "60 logged values, 25 shown" in text and "| 59 | 2.95 |" in text and "| 0 | 0 |" in text
    assert json.loads((adapter_dir / "nu_trajectory.json").read_text())[-1] == {"step": 59, "nu": pytest.approx(2.95)}

    nested = {"base": {"harmful_compliance_rate": 0.5, "per_prompt": [1, 0], "judge": "probe"},
              "dpo": {"harmful_compliance_rate": 0.25, "per_prompt": [0, 0], "judge": "probe"}}
    card = write_model_card(
        tmp_path, base_model="embedded", method="dpo", dataset="PKU-Alignment/PKU-SafeRLHF",
        hyperparameters={}, eval_table=nested, nu_trajectory=None,
    )
    assert "| model | harmful_compliance_rate | judge |" in card.read_text()  # lists stay out of the table
    assert "| change (dpo − base) | -0.25 |  |" in card.read_text()
    meta = yaml.safe_load(card.read_text().split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"] and "dpo" in meta["tags"]
    assert "dequantised from the Q4_1 GGUF" in card.read_text()
    assert not (tmp_path / "nu_trajectory.json").exists()
    assert hub_base_model_id("embedded") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_base_model_id(str(tmp_path)) is None

    with pytest.raises(ValueError, match=r"nu_trajectory\[1\]"):
        write_model_card(tmp_path, base_model="x", method="presa", dataset="d", hyperparameters={},
                         eval_table=None, nu_trajectory=[(0, 0.1), (1, float("nan"))])


def test_model_card_plot(tmp_path):
    """matplotlib is a dependency: the card always carries the ν plot, a 450 x 280 PNG (Agg)."""
    from PIL import Image

    write_model_card(tmp_path, base_model="embedded", method="presa", dataset="embedded", hyperparameters={},
                     eval_table=None, nu_trajectory=NU)
    assert (tmp_path / "nu_trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "nu_trajectory.png") as image:
        assert image.size == (450, 280)
        # The trajectory is drawn: pixels of matplotlib's first line colour, C0 = #1f77b4.
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
        assert (0x1F, 0x77, 0xB4) in colours
    assert "![ν trajectory](nu_trajectory.png)" in (tmp_path / "README.md").read_text()
    # No trajectory, no plot.
    write_model_card(tmp_path / "dpo", base_model="embedded", method="dpo", dataset="embedded", hyperparameters={},
                     eval_table=None, nu_trajectory=None)
    assert not (tmp_path / "dpo" / "nu_trajectory.png").exists()


def test_model_card_never_writes_a_secret(tmp_path):
    secret = "hf_CardSecret_0123456789"
    write_model_card(tmp_path, base_model="embedded", method="presa", dataset="embedded",
                     hyperparameters={"learning_rate": 1e-4, "hub_token": secret, "api_key": secret,
                                      "eval_max_new_tokens": 64},
                     eval_table=None, nu_trajectory=NU)
    text = (tmp_path / "README.md").read_text()
    assert "| hub_token | <redacted> |" in text and "| api_key | <redacted> |" in text
    assert "| eval_max_new_tokens | 64 |" in text  # not a secret, kept
    assert all(secret.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
