"""The reference's log-prob sums, memoised per batch on disk: a hit skips the reference forward.

With a LoRA policy the reference is the base model (the adapter off): frozen, so the same batch
always gives the same ``(2B,)`` sums. ``LabelledPreferenceTrainer`` (``reference_logps_cache:
true``) looks each training batch up here before running that forward, and stores what it
computes. A run whose batches were seen before (the default ``make train``, a re-run, a resumed
run, a sweep over learning rates or δ on the same data order) skips a quarter of each step
(``results/presa_step_profile.json``: the reference forward is 29 % of a step on the 2-core CPU).

Design decisions:

* **Bit-identical or nothing.** An entry is the exact float values the forward gave (stored as
  JSON numbers, which round-trip float32 exactly, with their dtype), found by the sha256 of the
  batch's own tensors (every tensor the forward reads: ``input_ids``, ``attention_mask``, the
  completion labels, ... with shapes and dtypes): the same batch, padding included, or a miss.
  Training with hits is bit-identical to training without the cache (``tests/test_reference_cache.py``).
* **The key is everything else the numbers depend on**: the base model folder's files (sha256,
  as the base-evaluation cache: ``llm_safepref.core.fingerprint``), the loaded model's dtype,
  attention implementation and quantisation, autocast, device type, ``torch.get_num_threads()``
  (reductions split differently), the library versions, and :data:`CACHE_VERSION` (bumped
  when the reference forward changes).
* **Only where it is exact**: no cache (and the reason is recorded) when the reference is not
  the frozen base model (a separate ``ref_model``, a ``ref`` adapter, no PEFT), when the method
  conditions the reference's inputs (Safe-CPL's soft prompt depends on a sampled z), when the
  model has active dropout (the reference forward would be random), or when the base model is
  not a local folder (nothing to fingerprint).
* **Two places**: ``cache_root()/reference_logps/<key>/`` (this machine's runs: one append-only
  JSONL per process, so ranks never write one file; a line cut short by a kill is skipped), then
  the entries shipped in the package (``SHIPPED_DIR/<key>/``: the default run's 60 batches at 2
  threads, written by ``make train`` and copied by ``python -m
  llm_safepref.methods.base.reference_cache ship KEY``).
* **Nothing hidden**: the trainer counts hits and misses (``reference_cache_report()``), and the
  recipes write that to ``run_metrics.json`` (``reference_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["CACHE_VERSION", "SHIPPED_DIR", "ReferenceLogpsCache", "batch_signature", "key_material", "ship",
           "user_cache_dir"]

#: Bump when the reference forward computes something different from the same inputs.
CACHE_VERSION = 1
#: Entries shipped in the package (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "reference_logps"
#: Libraries between the weights and the sums.
_KEY_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy")


def user_cache_dir() -> Path:
    from llm_safepref.core.paths import cache_root

    return cache_root() / "reference_logps"


def batch_signature(model_kwargs: dict[str, Any]) -> str:
    """sha256 over every tensor the reference forward reads (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(model_kwargs):
        value = model_kwargs[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        else:
            digest.update(f"{name}={value!r}|".encode())
    return digest.hexdigest()


def key_material(model_folder: str | os.PathLike, model: torch.nn.Module, *, autocast: str | None,
                 device_type: str, threads: int | None = None) -> dict[str, Any]:
    """Everything besides the batch that the reference's sums depend on."""
    from llm_safepref.core.fingerprint import model_files_fingerprint
    from llm_safepref.core.provenance import library_versions

    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    return {
        "cache_version": CACHE_VERSION,
        "model_files": model_files_fingerprint(model_folder),
        "dtype": str(getattr(model, "dtype", None)),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "quantization": quant.to_dict() if hasattr(quant, "to_dict") else quant,
        "autocast": autocast,
        "device_type": device_type,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "versions": library_versions(_KEY_LIBRARIES),
    }


class ReferenceLogpsCache:
    """The entries of one key: read from the user cache and the shipped copy, appended to the user cache."""

    def __init__(self, record: dict[str, Any], *, rank: int = 0, user_dir: Path | None = None,
                 shipped_dir: Path | None = None, provenance: dict[str, Any] | None = None):
        from llm_safepref.core.fingerprint import cache_key

        self.record = json.loads(json.dumps(record, default=str))
        self.key = cache_key(self.record)
        self.user_folder = (user_dir or user_cache_dir()) / self.key
        self.shipped_folder = (shipped_dir or SHIPPED_DIR) / self.key
        self.rank = rank
        self.provenance = provenance or {}
        self.entries: dict[str, tuple[str, list[float]]] = {}
        self.sources: dict[str, str] = {}
        self.hits = self.misses = 0
        self._pending: str | None = None
        self.hits_by_source: dict[str, int] = {}
        for source, folder in (("shipped", self.shipped_folder), ("user-cache", self.user_folder)):
            self._read(folder, source)
        self._file = None

    def _read(self, folder: Path, source: str) -> None:
        try:
            record = json.loads((folder / "record.json").read_text())
        except (OSError, json.JSONDecodeError):
            return
        if record.get("key") != self.key or record.get("key_material") != self.record:
            return  # another key's files (or a hand-edited record): not ours
        for path in sorted(folder.glob("logps-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    sig, dtype, values = row["sig"], row["dtype"], row["values"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
                if sig not in self.entries:
                    self.entries[sig] = (dtype, values)
                    self.sources[sig] = source

    def get(self, model_kwargs: dict[str, Any], device) -> torch.Tensor | None:
        sig = batch_signature(model_kwargs)
        hit = self.entries.get(sig)
        if hit is None:
            self.misses += 1
            self._pending = sig
            return None
        self.hits += 1
        self._pending = None  # a put() now would be for another batch: let it hash its own
        src = self.sources[sig]
        self.hits_by_source[src] = self.hits_by_source.get(src, 0) + 1
        dtype, values = hit
        return torch.tensor(values, dtype=getattr(torch, dtype), device=device)

    def put(self, model_kwargs: dict[str, Any], ref_logps: torch.Tensor) -> None:
        sig = getattr(self, "_pending", None) or batch_signature(model_kwargs)
        self._pending = None
        values = ref_logps.detach().to("cpu").tolist()
        dtype = str(ref_logps.dtype).removeprefix("torch.")
        self.entries[sig] = (dtype, values)
        self.sources[sig] = "user-cache"
        try:
            if self._file is None:
                self.user_folder.mkdir(parents=True, exist_ok=True)
                record_path = self.user_folder / "record.json"
                if not record_path.exists():
                    from llm_safepref.core.provenance import write_json

                    write_json(record_path, {"key": self.key, "key_material": self.record, **self.provenance})
                self._file = open(self.user_folder / f"logps-rank{self.rank}-pid{os.getpid()}.jsonl", "a")
            self._file.write(json.dumps({"sig": sig, "dtype": dtype, "values": values}) + "\n")
            self._file.flush()
        except OSError as err:  # a read-only cache never stops training
            print(f"reference cache: not stored ({err})", file=sys.stderr)

    def report(self) -> dict[str, Any]:
        return {"enabled": True, "key": self.key, "hits": self.hits, "misses": self.misses,
                "hits_by_source": dict(self.hits_by_source), "user_folder": str(self.user_folder)}


_PROVENANCE = ("command", "date", "git_revision", "machine")


def _rows(folder: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in sorted(folder.glob("logps-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows.setdefault(row["sig"], row)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def ship(key: str, *, user_dir: Path | None = None, shipped_dir: Path | None = None, replace: bool = False) -> Path:
    """Copy the user cache's entry ``key`` into the package (one merged, sorted JSONL).

    Batches already shipped under ``key`` are kept (several recipes' default runs share one key: the
    same model, threads and libraries), unless ``replace``.
    """
    src = (user_dir or user_cache_dir()) / key
    record = json.loads((src / "record.json").read_text())
    dest = (shipped_dir or SHIPPED_DIR) / key
    rows = {} if replace or not dest.exists() else _rows(dest)
    kept = len(rows)
    # Which runs wrote the shipped batches: the earlier record's runs, then this one.
    runs = []
    if rows and (dest / "record.json").is_file():
        before = json.loads((dest / "record.json").read_text())
        runs = before.get("shipped_runs") or [{k: before[k] for k in _PROVENANCE if k in before}]
    this_run = {k: record[k] for k in _PROVENANCE if k in record}
    if this_run not in runs:
        runs.append(this_run)
    record["shipped_runs"] = runs
    for sig, row in _rows(src).items():
        rows.setdefault(sig, row)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    with open(dest / "logps-shipped.jsonl", "w") as fh:
        for sig in sorted(rows):
            fh.write(json.dumps(rows[sig]) + "\n")
    print(f"shipped {len(rows)} batches of {key} ({kept} kept from before) -> {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    from llm_safepref.core.cli import ToolParser

    parser = ToolParser(prog="python -m llm_safepref.methods.base.reference_cache",
                        description="Ship a reference log-prob cache entry of this machine with the package.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ship", help="copy cache_root()/reference_logps/KEY into the package")
    s.add_argument("key", help="the entry's key (run_metrics.json: reference_cache.key)")
    s.add_argument("--replace", action="store_true", help="drop the batches already shipped under KEY")
    args = parser.parse_args(argv)
    if not (user_cache_dir() / args.key / "record.json").is_file():
        parser.error(f"no entry {args.key!r} under {user_cache_dir()} (run make train first)")
    ship(args.key, replace=args.replace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
