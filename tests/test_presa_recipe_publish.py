"""The PRESA recipe's ``--push_to_hub`` end to end, against a real HTTP Hub server on 127.0.0.1.

``recipes/presa_lora.py`` trains the tiny model for a few steps in a subprocess whose
``HF_HUB_OFFLINE=0`` / ``HF_ENDPOINT`` / ``HF_TOKEN`` point at ``tests.hub_server.HubServer``
(huggingface_hub reads them at import time, hence the subprocess). The recipe is run as
``__main__`` through a small runner that only wraps ``llm_safepref.publish.publish_adapter``
to record a sha256 snapshot of the output folder at the moment the publish step starts, so
"the local adapter is what was written before the publish attempt" is checked byte for byte.

* success: exit 0; the server holds the adapter, its config, the model card and
  ``lagrange.json`` byte-identical to the local files (no training leftovers); the card names
  the method and lists the ν trajectory of the run; ``PeftModel.from_pretrained(base, repo_id)``
  in a fresh process with a fresh cache, downloading from the server, gives the local weights.
* failure (the server answers 500 on the commit): exit 1, "publishing failed" on stderr with
  the repo id and the local path, nothing committed, training done, the local folder unchanged
  by the publish attempt and the adapter loadable.
* secrets: with ``--hub_token`` on the command line (and no ``HF_TOKEN``), the publish succeeds
  with that token, and no file of the output folder (checkpoints and ``training_args.bin``
  included) nor any file uploaded to the server contains the token's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.pairs import write_pairs

from tests.hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "presa_lora.py"
TOKEN = "hf_test_token"
STEPS = 3
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md", "lagrange.json")




def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Runs the recipe as __main__ (same argv, same sys.exit code); publish_adapter is wrapped to
# record the output folder's sha256 snapshot just before the real publish starts.
_RUNNER = r"""
import hashlib, json, os, runpy, sys
from pathlib import Path

import llm_safepref.publish as publish

_real = publish.publish_adapter

def _recording_publish(local_dir, repo_id, **kwargs):
    folder = Path(local_dir)
    snap = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
    Path(os.environ["PUBLISH_SNAPSHOT"]).write_text(json.dumps({"repo_id": repo_id, "files": snap}))
    return _real(local_dir, repo_id, **kwargs)

publish.publish_adapter = _recording_publish
recipe = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
"""


def _env(hub_url: str, tmp_path: Path, snapshot_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub_url,
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"),  # fresh cache, no saved token
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PUBLISH_SNAPSHOT=str(snapshot_file),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def _run_recipe(hub: HubServer, model, tmp_path: Path, repo_id: str, extra: tuple[str, ...] = (),
                env_overrides: dict[str, str | None] | None = None):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    snapshot_file = tmp_path / "publish_snapshot.json"
    cmd = [
        sys.executable, "-c", _RUNNER, str(RECIPE),
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--skip_eval", "true",
        "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--learning_rate", "5e-3",
        "--save_steps", "2", "--max_length", "128", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu", "true",
        "--push_to_hub", "true", "--hub_repo_id", repo_id, *extra,
    ]
    env = _env(hub.url, tmp_path, snapshot_file)
    for key, value in (env_overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    snapshot = json.loads(snapshot_file.read_text()) if snapshot_file.exists() else None
    return proc, out, snapshot


def _report(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def _check_trained(out: Path, proc) -> dict:
    """Training and the local outputs happened; returns run_metrics.json."""
    assert f"presa run finished: {STEPS} steps" in proc.stdout, _report(proc)
    for name in (*ADAPTER_FILES, "run_metrics.json", "nu_trajectory.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "run_metrics.json").read_text())
    assert metrics["global_step"] == STEPS and len(metrics["nu_trajectory"]) == STEPS
    return metrics


_LOAD_SCRIPT = r"""
import json, sys
import torch
from huggingface_hub import constants
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_path, repo_id, local_dir = sys.argv[1:4]
assert not constants.HF_HUB_OFFLINE
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), repo_id)
remote = get_peft_model_state_dict(model)
local = load_file(f"{local_dir}/adapter_model.safetensors")
print(json.dumps({
    "endpoint": constants.ENDPOINT,
    "same_keys": sorted(remote) == sorted(local),
    "n_tensors": len(local),
    "equal": all(torch.equal(remote[k], local[k]) for k in local if k in remote),
    "nonzero_b": any(bool(local[k].abs().sum() > 0) for k in local if "lora_B" in k),
}))
"""


def test_push_to_hub_publishes_trained_adapter(tiny_model_path, tmp_path):
    repo_id = "user/tiny-presa-recipe"
    with HubServer(tokens={TOKEN: "user"}) as hub:
        proc, out, snapshot = _run_recipe(hub, tiny_model_path, tmp_path, repo_id)
        assert proc.returncode == 0, _report(proc)
        metrics = _check_trained(out, proc)
        assert f"Published {out} to {repo_id}: {hub.url}/{repo_id}/commit/" in proc.stdout

        # What the publish step saw is what is on disk now (publishing changes nothing local).
        assert snapshot is not None and snapshot["repo_id"] == repo_id
        assert _snapshot(out) == snapshot["files"]

        # The server holds the adapter, byte for byte; no training leftovers.
        remote = hub.files(repo_id)
        for name in (*ADAPTER_FILES, "nu_trajectory.json"):
            assert name in remote, f"{name} not uploaded: {sorted(remote)}"
            assert remote[name] == (out / name).read_bytes(), name
        assert not any(p.startswith(("checkpoint-", "runs/")) or p.endswith((".pt", ".pth")) for p in remote), sorted(remote)
        # Only the publish step talked to the Hub: one repo, one create, one commit (TRL's own
        # push_to_hub would have created a repo at trainer construction and pushed every checkpoint).
        assert list(hub.repos) == [repo_id] and not hub.repos[repo_id].private
        assert [r for r in hub.requests if r[1] == "/api/repos/create" or "/commit/" in r[1]] == [
            ("POST", "/api/repos/create"), ("POST", f"/api/models/{repo_id}/commit/main")], hub.requests

        # The model card names the method and lists this run's ν trajectory.
        card = remote["README.md"].decode("utf-8")
        assert card.startswith("---\n") and "library_name: peft" in card and "- presa" in card
        assert f"# {repo_id}" in card and "trained with **presa**" in card and "PRESA: one objective" in card
        assert f'PeftModel.from_pretrained(base, "{repo_id}")' in card
        nu_section = card.split("## Lagrange multiplier ν", 1)[1].split("\n## ", 1)[0]
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in nu_section.splitlines() if line.startswith("|")][2:]  # header, separator
        assert [int(r[0]) for r in rows] == [s for s, _ in metrics["nu_trajectory"]] == list(range(1, STEPS + 1))
        for (_, shown), (_, nu) in zip(rows, metrics["nu_trajectory"]):
            assert float(shown) == pytest.approx(nu, rel=1e-3, abs=1e-6)
        assert f"{STEPS} logged values" in nu_section
        assert json.loads(remote["lagrange.json"])["value"] == pytest.approx(metrics["nu_trajectory"][-1][1])

        # Download side: a fresh process and cache, PeftModel.from_pretrained(base, repo_id) via the server.
        n_before = len(hub.requests)
        load = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(tiny_model_path), repo_id, str(out)],
            env=_env(hub.url, tmp_path / "loader", tmp_path / "unused.json"),
            capture_output=True, text=True, timeout=120,
        )
        assert load.returncode == 0, load.stderr[-3000:]
        loaded = json.loads(load.stdout.strip().splitlines()[-1])
        assert loaded["endpoint"] == hub.url
        assert loaded["n_tensors"] > 0 and loaded["same_keys"] and loaded["equal"], loaded
        assert loaded["nonzero_b"], "training left every lora_B at zero: the adapter is a no-op"
        assert ("GET", f"/{repo_id}/resolve/main/adapter_model.safetensors") in hub.requests[n_before:]


def test_failed_publish_exits_nonzero_and_keeps_adapter(tiny_model_path, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    repo_id = "user/tiny-presa-fails"
    with HubServer(tokens={TOKEN: "user"}) as hub:
        hub.fail_commit_status = 500  # the repo is created, the upload commit is refused
        proc, out, snapshot = _run_recipe(hub, tiny_model_path, tmp_path, repo_id)
        assert proc.returncode == 1, _report(proc)
        assert "ERROR: publishing failed:" in proc.stderr, _report(proc)
        message = proc.stderr.split("ERROR: publishing failed:", 1)[1]
        assert repo_id in message and "HTTP 500" in message
        assert f"The adapter is still at {out.resolve()}" in message
        assert "Traceback" not in proc.stderr, _report(proc)  # a message, not a crash
        assert "Published" not in proc.stdout
        # The server was reached, but nothing of the adapter was committed.
        assert ("POST", f"/api/models/{repo_id}/commit/main") in hub.requests
        assert set(hub.files(repo_id)) == {".gitattributes"}

    # Training happened and the local outputs are exactly what existed when publishing started.
    _check_trained(out, proc)
    assert snapshot is not None and snapshot["repo_id"] == repo_id
    assert _snapshot(out) == snapshot["files"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), out)
    local = load_file(str(out / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(local) and all(torch.equal(loaded[k], local[k]) for k in local)


def test_hub_token_flag_publishes_and_is_written_nowhere(tiny_model_path, tmp_path):
    """``--hub_token`` is used to publish, and no byte of it is in any written or uploaded file."""
    import torch

    secret = "hf_FakeSecret_7q2Zx9LmW4vB"
    repo_id = "user/tiny-presa-secret"
    with HubServer(tokens={secret: "user"}) as hub:  # only the flag's token is accepted
        proc, out, _ = _run_recipe(hub, tiny_model_path, tmp_path, repo_id, extra=("--hub_token", secret),
                                   env_overrides={"HF_TOKEN": None})
        assert proc.returncode == 0, _report(proc)
        assert f"Published {out} to {repo_id}: {hub.url}/{repo_id}/commit/" in proc.stdout
        remote = hub.files(repo_id)
        assert "adapter_model.safetensors" in remote and "README.md" in remote
        leaked_remote = [name for name, data in remote.items() if secret.encode() in data]
    assert not leaked_remote, leaked_remote

    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    # The files that used to carry it are there, so the search below means something.
    assert {"run_metrics.json", "training_args.bin", "checkpoint-2/training_args.bin", "README.md"} <= names, names
    leaked = [p.relative_to(out).as_posix() for p in files if secret.encode() in p.read_bytes()]
    assert not leaked, f"the token is written in {leaked}"
    for name in ("training_args.bin", "checkpoint-2/training_args.bin"):
        assert torch.load(out / name, weights_only=False).hub_token is None, name
    metrics = json.loads((out / "run_metrics.json").read_text())
    assert "--hub_token <redacted>" in metrics["command"]
    assert secret not in proc.stdout + proc.stderr
