"""The Safe-CPL artefact: one folder with everything a conditioned policy needs, saved, loaded, published.

Folder layout (every checkpoint has the first four, ``lagrange.json`` only with the safety term;
:func:`save_artifact` adds the rest):

* ``adapter_config.json``, ``adapter_model.safetensors``: the LoRA adapter AND the conditioner
  (encoder, prior, projection, feature statistics), as PEFT ``modules_to_save``;
* tokenizer files: the tokenizer the policy was trained with;
* ``safe_cpl.json`` (:data:`SPEC_FORMAT`): the base model, the conditioner's shapes, the context
  embedder and its id, the context-set sizes, the run record;
* ``lagrange.json``: nu, with ``safety_term`` (written by the base trainer);
* ``users.json``: every training user's z (mean posterior mean over the user's examples);
* ``README.md``: the model card (``llm_safepref.publish.write_model_card`` + Safe-CPL's sections).

Design decisions:

* One PEFT adapter file holds all trained weights, so ``publish_adapter`` (which checks for a
  PEFT adapter) publishes the artefact as it is, and a resume restores the conditioner with
  the adapter. ``safe_cpl.json`` is what makes the folder a Safe-CPL policy:
  :func:`load_policy_model` rebuilds the conditioner from it, registers it on the base model
  and lets ``PeftModel.from_pretrained`` fill LoRA and conditioner weights (it refuses an
  adapter file without conditioner weights instead of running a random conditioner).
* A Hub id is fetched with ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE``
  and ``HF_ENDPOINT``); a local folder is used in place.
* The model card is the toolkit's (``write_model_card``, tags, hyperparameters, nu), with its
  "Method" and "How to load" sections replaced by Safe-CPL's: a plain ``PeftModel.from_pretrained``
  would not know the conditioner.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from llm_safepref.core.provenance import run_record, write_json

__all__ = [
    "SPEC_FILE",
    "SPEC_FORMAT",
    "USERS_FILE",
    "load_policy_model",
    "publish_artifact",
    "read_spec",
    "read_users",
    "resolve_artifact",
    "save_artifact",
    "write_spec",
]

SPEC_FILE = "safe_cpl.json"
USERS_FILE = "users.json"
SPEC_FORMAT = "llm_safepref.safe_cpl/1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

_METHOD_TEXT = (
    "Safe-CPL, stage 1 (Lin & Brown, ICML 2026): a policy π(y | x, z) conditioned on a latent user variable z, "
    "learned from a crowd's preference pairs with the {loss} loss. z is inferred by a variational encoder "
    "q(z | context) over a few of the user's own annotated pairs (VPL), regularised by KL(q ‖ p(z)) toward a "
    "{prior} prior (weight up to {kl_weight}, cyclic annealing), and enters the policy as {p} soft-prompt vectors "
    "prepended to the input embeddings. The reference is the base model without the adapter and without the soft "
    "prompt. {safety}"
)


def write_spec(folder: str | os.PathLike, trainer) -> Path:
    """Write ``safe_cpl.json`` for ``trainer``'s policy into ``folder``."""
    from llm_safepref.methods.safe_cpl.embeddings import PAIR_FEATURE_ORDER
    from llm_safepref.methods.safe_cpl.model import CONDITIONER_NAME

    args = trainer.args
    prompts = trainer._pools[0].prompts
    spec = {
        "format": SPEC_FORMAT,
        "method": "safe-cpl",
        "stage": 1,
        "base_model": trainer.base_model_name,
        "conditioner_name": CONDITIONER_NAME,
        "conditioner": trainer.conditioner.config.to_dict(),
        "context_encoder": args.context_encoder,
        "encoder_id": trainer.context_embedder.encoder_id,
        "context_max_tokens": args.context_max_tokens,
        "context_include_prompt": args.context_include_prompt,
        "pair_features": list(PAIR_FEATURE_ORDER[: 3 if args.context_include_prompt else 2]),
        "context_min": args.context_min,
        "context_max": args.context_max,
        "user_column": args.user_column,
        "prior": args.prior,
        "conversational": bool(prompts) and isinstance(prompts[0], list),
        "pref_loss": args.pref_loss,
        "safety_term": args.safety_term,
        "kl_weight": args.kl_weight,
        "kl_cycles": args.kl_cycles,
        "encoder_trained": not args.freeze_encoder,
        "reference": "the base model without the adapter and without the soft prompt",
        "global_step": trainer.state.global_step,
    }
    return write_json(Path(folder) / SPEC_FILE, run_record(**spec))


def read_spec(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``safe_cpl.json`` of an artefact folder (``FileNotFoundError`` / ``ValueError`` explain what is wrong)."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Safe-CPL artefact: no {SPEC_FILE} (write one with "
                                "SafeCPLTrainer.save_artifact or save_model)")
    try:
        spec = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    return spec


def read_users(folder: str | os.PathLike) -> dict[str, list[float]]:
    """``{user: z}`` from ``users.json`` (empty when the folder has none, e.g. a checkpoint)."""
    path = Path(folder) / USERS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {u: entry["z"] for u, entry in data["users"].items()}


def save_artifact(trainer, output_dir: str | os.PathLike, *, dataset_name: str = "crowd",
                  eval_table: dict | None = None, repo_id: str | None = None) -> str:
    """Save ``trainer``'s policy as one artefact folder (see the module docstring); returns the folder."""
    from llm_safepref.publish import write_model_card

    out = Path(output_dir)
    trainer.save_model(str(out))  # adapter + conditioner, tokenizer, safe_cpl.json, lagrange.json
    users = trainer.user_latents()  # every rank computes (cheap); one writes
    if not trainer.args.should_save:
        return str(out)
    conditioner = trainer.conditioner
    write_json(out / USERS_FILE, run_record(
        users=users, latent_dim=conditioner.config.latent_dim, prior_mean=conditioner.prior_mean().tolist(),
        how="per user: the mean over the user's training examples of the posterior mean of q(z | context set)"))
    args = trainer.args
    hyperparameters = {
        "pref_loss": args.pref_loss, "cpl_alpha": args.cpl_alpha, "cpl_bias": args.cpl_bias, "beta": args.beta,
        "latent_dim": args.latent_dim, "prior": args.prior, "n_soft_tokens": args.n_soft_tokens,
        "encoder_hidden_size": args.encoder_hidden_size, "context_encoder": args.context_encoder,
        "context_min": args.context_min, "context_max": args.context_max, "kl_weight": args.kl_weight,
        "kl_cycles": args.kl_cycles, "freeze_encoder": args.freeze_encoder, "safety_term": args.safety_term,
        "learning_rate": args.learning_rate, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_steps": trainer.state.max_steps,
        "seed": args.seed, "users": len(users),
    }
    if args.safety_term:
        hyperparameters.update(safety_beta=args.safety_beta, safety_delta=args.safety_delta, nu_lr=args.nu_lr)
    trajectory = [(e["step"], e["nu"]) for e in trainer.nu_trajectory()] if args.safety_term else None
    card = write_model_card(out, base_model=trainer.base_model_name, method="safe-cpl", dataset=dataset_name,
                            hyperparameters=hyperparameters, eval_table=eval_table, nu_trajectory=trajectory,
                            repo_id=repo_id)
    safety = ("PRESA's Lagrangian safety term on the responses' safety labels is added (multiplier ν)."
              if args.safety_term else "Safety comes from the crowd's preferences only (no safety-label term).")
    method = _METHOD_TEXT.format(loss=args.pref_loss.upper(), prior=args.prior, kl_weight=args.kl_weight,
                                 p=args.n_soft_tokens, safety=safety)
    load_id = repo_id or str(out)
    how = (
        "```python\n"
        "from llm_safepref.methods.safe_cpl import SafeCPLPolicy\n\n"
        f'policy = SafeCPLPolicy.from_pretrained("{load_id}")\n'
        'print(policy.generate(["How do I boil an egg?"]))                    # z = the prior mean\n'
        'print(policy.generate(["How do I boil an egg?"], user="<user id>"))  # a training user\'s z\n'
        'print(policy.generate(["How do I boil an egg?"], context=pairs))     # z inferred from a new user\'s pairs\n'
        "```\n\n"
        f"or `python -m llm_safepref.methods.safe_cpl generate --model {load_id} --prompt \"...\"` "
        "(`--z`, `--context FILE.jsonl` or `--user ID`). Training users: "
        + (", ".join(f"`{u}`" for u in users) or "none") + "."
    )
    text = card.read_text(encoding="utf-8")
    text = _replace_section(text, "## Method", method)
    text = _replace_section(text, "## How to load", how)
    card.write_text(text, encoding="utf-8")
    return str(out)


def _replace_section(text: str, heading: str, body: str) -> str:
    """Replace the body of a ``## `` section of a markdown card (appended when the heading is missing)."""
    start = text.find(f"\n{heading}\n")
    if start < 0:
        return text.rstrip("\n") + f"\n\n{heading}\n\n{body}\n"
    begin = start + len(heading) + 2
    nxt = text.find("\n## ", begin)
    end = nxt if nxt >= 0 else len(text)
    return text[:begin] + "\n" + body + "\n" + text[end:]


# ---------------------------------------------------------------------- loading


def resolve_artifact(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                     endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local artefact folder: the path itself, or a Hub snapshot (``snapshot_download``) of a repo id."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"{name!r} is neither a folder nor a Hub repo id (namespace/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir))


def load_policy_model(folder: str | os.PathLike, *, base_model: str | None = None, device=None, dtype=None):
    """``(PeftModel with the conditioner, tokenizer, spec)`` from a local artefact folder.

    ``base_model`` overrides the base recorded in ``safe_cpl.json`` (e.g. the same model at
    another path). The model is in eval mode, on ``device`` (default: CPU).
    """
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.methods.safe_cpl.model import (
        CONDITIONER_NAME,
        ConditionerConfig,
        LatentConditioner,
        attach_conditioner,
    )
    from llm_safepref.models import resolve_model_name

    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        if not any(CONDITIONER_NAME in key for key in f.keys()):
            raise ValueError(f"{weights} holds no {CONDITIONER_NAME} weights: the adapter was saved without the "
                             "latent conditioner (not by SafeCPLTrainer)")
    base = base_model or spec["base_model"]
    if not base:
        raise ValueError(f"{folder / SPEC_FILE} names no base model; pass base_model=")
    path = resolve_model_name(base)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder) if has_tokenizer else path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    attach_conditioner(model, LatentConditioner(ConditionerConfig.from_dict(spec["conditioner"])))
    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_model.eval()
    if device is not None:
        peft_model.to(device)
    return peft_model, tokenizer, spec


def publish_artifact(local_dir: str | os.PathLike, repo_id: str, **kwargs) -> str:
    """Publish an artefact folder with ``llm_safepref.publish.publish_adapter`` (after checking it is one)."""
    from llm_safepref.publish import publish_adapter

    read_spec(local_dir)
    kwargs.setdefault("commit_message", "Upload Safe-CPL policy (LoRA adapter + latent conditioner) by llm_safepref")
    return publish_adapter(local_dir, repo_id, **kwargs)
