"""Content fingerprints for caches keyed by what their numbers depend on (bytes, not paths or dates).

Used by the base model's evaluation cache (``llm_safepref.recipes.base_eval``) and the reference
log-prob cache (``llm_safepref.methods.base.reference_cache``): the sha256 of a file, the files of a
model folder that shape its outputs, and a short key over a canonical JSON record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MODEL_FILES_IGNORED", "MODEL_FILE_SUFFIXES", "cache_key", "file_sha256", "local_model_folder",
           "model_files_fingerprint"]

#: Files of a model folder that shape its outputs (weights, configs, tokenizer, chat template).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".tiktoken")
#: Files of a model folder that name where it came from, not what it computes.
MODEL_FILES_IGNORED = ("llm_safepref_conversion.json", "tiny_model.json", "training_args.bin", "README.md")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def local_model_folder(model: str, revision: str | None = None) -> Path | None:
    """The folder holding ``model``: itself when local, else its snapshot in the local Hub cache (or None)."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not cached locally, or not a Hub id: no fingerprint, hence no cache
        return None


def model_files_fingerprint(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of the files of a model folder that shape its outputs (top level, sorted)."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(MODEL_FILE_SUFFIXES) and path.name not in MODEL_FILES_IGNORED:
            out[path.name] = file_sha256(path)
    if not any(name.endswith((".safetensors", ".bin")) for name in out):
        raise ValueError(f"{folder}: no weight file (*.safetensors / *.bin) to fingerprint")
    return out


def cache_key(record: dict[str, Any]) -> str:
    """First 20 hex digits of sha256 over the record as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
