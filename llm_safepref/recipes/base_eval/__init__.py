"""The base model's evaluation, cached: a recipe need not evaluate the untouched base model again.

Every recipe run evaluates the base model before training (the ``before`` of its table). With
the same model, benchmark prompts, settings, judge, threads and libraries that evaluation is the
same every time (greedy decoding; sampling is seeded), so it is looked up instead of recomputed.

Design decisions:

* **The key is everything the numbers depend on**, and nothing they do not (no paths, dates or
  git revision): a fingerprint of the model folder's files (weights, config, generation config,
  tokenizer, chat template: sha256 of their bytes; the conversion note that names a local path is
  left out), the benchmark's version and the sha256 of the split's evaluation prompts, the
  split, ``limit`` / ``limit_per_category`` / ``categories``, the generation settings
  (``max_new_tokens``, ``batch_size``: padding changes greedy answers at the last digit;
  ``do_sample``; the seed), the judge (version, feature set, sha256 of its weights; a plug-in's
  own digests), the judge audit file's sha256, ``torch.get_num_threads()`` and the versions of
  the libraries on the path from weights to verdicts (python, torch, transformers, tokenizers,
  safetensors, numpy, the judge's encoder package), plus :data:`CACHE_VERSION` (bumped when the
  evaluation code changes what it computes). The key is the first 20 hex digits of the sha256 of
  that record as canonical JSON; the record itself is stored beside the result.
* **Two places, in order**: ``cache_root()/base_eval/<key>.json`` (this machine's runs), then
  the copy shipped in the package (``llm_safepref/recipes/base_eval/<key>.json``), produced by this
  same code with ``make train``'s defaults at 2 threads
  (``make base-eval``: ``accelerate launch --num_cpu_threads_per_process 2 recipes/presa_lora.py
  --eval_base_only true``, then :func:`ship` copies the entry here). A miss evaluates and stores in
  the user cache, never in the package.
* **Nothing is hidden**: the recipe's ``run_metrics.json`` gets ``base_eval_cache`` (``hit`` true /
  false, ``source`` user-cache / shipped / evaluated / disabled, the file, the key and the record
  of the run that evaluated it: command, git revision, date, machine), and the run prints one line.
  ``--eval_base_cache false`` turns it off.
* A hit returns the stored evaluation unchanged except ``model`` and ``judge`` (which name local
  paths: the current ones are put in; the key proves they hold the same bytes).
* Where the model cannot be fingerprinted (a Hub id not in the local Hub cache) or the judge is a
  Python callable (its version is only known after its first call), there is no cache and the
  record says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from llm_safepref.core.fingerprint import cache_key, file_sha256, model_files_fingerprint
from llm_safepref.core.fingerprint import local_model_folder as _local_model_folder

__all__ = ["CACHE_VERSION", "SHIPPED_DIR", "benchmark_identity", "cache_key", "cached_base_evaluation",
           "file_sha256", "judge_key", "key_material", "library_versions_key", "lookup", "model_files_fingerprint", "ship", "store",
           "user_cache_dir"]

#: Bump when the evaluation computes something different from the same inputs.
CACHE_VERSION = 1
#: The shipped entries (package data).
SHIPPED_DIR = Path(__file__).resolve().parent
#: Libraries between the weights and the verdicts (distribution names).
_KEY_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy")








def benchmark_identity(benchmark: str, split: str) -> dict[str, Any]:
    """``{"version", "eval_prompts", "eval_prompts_sha256", "n_eval_prompts"}`` of a benchmark's ``split``.

    The version is the build's ``manifest.json`` ``version`` (None where there is none). The hash
    is over the split's evaluation prompt rows as canonical JSON (every column, in file order), so
    the shipped JSON lines and a cache build's Arrow folder of the same prompts hash alike; the
    file's name is recorded relative to the build folder (no local path in the key).
    """
    from llm_safepref.data.adapters import _resolve, load_eval_prompts

    path = Path(_resolve(benchmark, "eval_prompts", split)[0])
    manifest = next((p / "manifest.json" for p in (path.parent, path.parent.parent) if (p / "manifest.json").is_file()),
                    None)
    version = json.loads(manifest.read_text()).get("version") if manifest is not None else None
    name = str(path.relative_to(manifest.parent)) if manifest is not None else path.name
    rows = [dict(r) for r in load_eval_prompts(benchmark, split)]
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return {"version": version, "eval_prompts": name, "n_eval_prompts": len(rows),
            "eval_prompts_sha256": hashlib.sha256(text.encode()).hexdigest()}


def judge_key(judge) -> dict[str, Any] | None:
    """What identifies a resolved judge's verdicts, without local paths; None for a Python callable."""
    from llm_safepref.judge import judge_identity
    from llm_safepref.judge.plugins import judge_kind

    kind = judge_kind(judge)
    if kind == "callable":
        return None
    identity = dict(judge_identity(judge))
    weights = identity.pop("weights", None)
    if weights and Path(weights).is_file():
        identity["weights_sha256"] = file_sha256(weights)
    for key in ("path", "file"):
        identity.pop(key, None)
    refusal = identity.get("refusal_judge")
    if isinstance(refusal, dict) and refusal.get("weights") and Path(refusal["weights"]).is_file():
        identity["refusal_judge"] = {**{k: v for k, v in refusal.items() if k != "weights"},
                                     "weights_sha256": file_sha256(refusal["weights"])}
    return {"kind": kind, **identity}


def _library_versions() -> dict[str, str | None]:
    """The key's library versions: the core's ``library_versions`` over the key libraries and the judge encoder's
    distribution(s)."""
    from importlib import metadata

    from llm_safepref.core.provenance import library_versions

    names = list(_KEY_LIBRARIES)
    try:
        from llm_safepref.judge import _ENCODER_PACKAGE

        names += metadata.packages_distributions().get(_ENCODER_PACKAGE, [])
    except ImportError:
        pass
    return library_versions(tuple(names))


def library_versions_key() -> dict[str, str | None]:
    """The library versions a cached model output is keyed by (the base evaluation's; also the Safe-CPL recipe's
    cached base samples)."""
    return _library_versions()


def key_material(*, model: str, benchmark: str, split: str, limit: int | None, limit_per_category: int | None,
                 categories, max_new_tokens: int, batch_size: int, seed: int, judge, judge_audit: str | None,
                 do_sample: bool = False, temperature: float | None = None, revision: str | None = None,
                 threads: int | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)``: everything the base evaluation depends on; ``(None, reason)`` when it cannot be keyed."""
    import torch

    from llm_safepref.eval import _category_list

    folder = _local_model_folder(model, revision)
    if folder is None:
        return None, f"the model {model!r} is neither a local folder nor in the local Hub cache: no fingerprint"
    judged = judge_key(judge)
    if judged is None:
        return None, "the judge is a Python callable (its version is known only after it runs)"
    record = {
        "cache_version": CACHE_VERSION,
        "model_files": model_files_fingerprint(folder),
        "benchmark": benchmark_identity(benchmark, split),
        "split": split,
        "limit": limit,
        "limit_per_category": limit_per_category,
        "categories": _category_list(categories),
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": bool(do_sample),
                       "temperature": temperature if do_sample else None, "seed": seed},
        "judge": judged,
        "judge_audit_sha256": file_sha256(judge_audit) if judge_audit else None,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "versions": _library_versions(),
    }
    return record, None




def user_cache_dir() -> Path:
    from llm_safepref.core.paths import cache_root

    return cache_root() / "base_eval"


def _read_entry(path: Path, key: str, record: dict) -> dict | None:
    """The entry at ``path`` when it is a complete entry for exactly ``record`` (else None: a miss)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("key") != key or entry.get("key_material") != json.loads(json.dumps(record, default=str)):
        return None
    return entry if isinstance(entry.get("result"), dict) else None


def lookup(key: str, record: dict, *, shipped_dir: Path | None = None) -> tuple[dict | None, str | None, Path | None]:
    """``(entry, source, path)``: the user cache first, then the shipped copy; ``(None, None, None)`` on a miss."""
    for source, folder in (("user-cache", user_cache_dir()), ("shipped", shipped_dir or SHIPPED_DIR)):
        path = folder / f"{key}.json"
        if path.is_file():
            entry = _read_entry(path, key, record)
            if entry is not None:
                return entry, source, path
    return None, None, None


def store(key: str, record: dict, result: dict, *, folder: Path | None = None) -> Path:
    """Write ``{run record, key, key_material, result}`` at ``<folder or user cache>/<key>.json`` (atomic)."""
    from llm_safepref.core.provenance import run_record, write_json

    path = (folder or user_cache_dir()) / f"{key}.json"
    write_json(path, run_record(key=key, key_material=record, result=result))
    return path


def _provenance(entry: dict) -> dict:
    return {k: entry.get(k) for k in ("command", "git_revision", "date", "machine")}


def cached_base_evaluation(evaluate: Callable[..., dict], *, model: str, use_cache: bool = True,
                           shipped_dir: Path | None = None, **settings) -> tuple[dict, dict]:
    """``(result, cache record)``: the base model's evaluation from the cache, or ``evaluate()`` (then stored).

    ``evaluate(judge)`` runs the evaluation with the resolved judge; ``settings`` are the
    :func:`key_material` keywords (``judge`` is the resolved judge, or its spec). The cache
    record is what ``run_metrics.json`` carries as ``base_eval_cache``.
    """
    from llm_safepref.judge import judge_identity, resolve_judge

    judge = resolve_judge(settings.pop("judge", None))
    if not use_cache:
        return evaluate(judge), {"hit": False, "source": "disabled", "reason": "--eval_base_cache false"}
    record, reason = key_material(model=model, judge=judge, **settings)
    if record is None:
        return evaluate(judge), {"hit": False, "source": "uncacheable", "reason": reason}
    key = cache_key(record)
    entry, source, path = lookup(key, record, shipped_dir=shipped_dir)
    if entry is not None:
        result = dict(entry["result"])
        result["model"], result["judge"] = str(model), judge_identity(judge)  # local paths of this machine
        return result, {"hit": True, "source": source, "file": str(path), "key": key, "evaluated_by": _provenance(entry)}
    result = evaluate(judge)
    path = store(key, record, result)
    return result, {"hit": False, "source": "evaluated", "file": str(path), "key": key, "stored": True}


def ship(base_eval_file: str | os.PathLike, folder: Path | None = None) -> Path:
    """Copy the cache entry named by an ``--eval_base_only`` run's ``base_eval.json`` into the package.

    Refuses an entry the run did not key (cache off, or an uncacheable model or judge). An entry
    read from the shipped copy is already there; its path is returned.
    """
    import shutil

    record = json.loads(Path(base_eval_file).read_text()).get("base_eval_cache") or {}
    if not record.get("key") or not record.get("file"):
        raise ValueError(f"{base_eval_file}: base_eval_cache has no cache entry to ship ({record.get('source')}: "
                         f"{record.get('reason')})")
    source, target = Path(record["file"]), (folder or SHIPPED_DIR) / f"{record['key']}.json"
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    from llm_safepref.core.cli import ToolParser

    parser = ToolParser(prog="python -m llm_safepref.recipes.base_eval",
                        description="The base-evaluation cache: ship an --eval_base_only run's entry into the package, "
                                    "or list the shipped entries.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_ship = sub.add_parser("ship", help="copy the entry of an --eval_base_only run into llm_safepref/recipes/base_eval/")
    p_ship.add_argument("base_eval_json", help="<output_dir>/base_eval.json of the --eval_base_only run")
    sub.add_parser("list", help="the shipped entries: key, benchmark, prompts, threads, date")
    args = parser.parse_args(argv)
    if args.command == "ship":
        print(f"shipped {ship(args.base_eval_json)}")
        return 0
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        km = entry.get("key_material", {})
        print(f"{path.name}: {km.get('benchmark', {}).get('version')} {km.get('split')}, "
              f"{entry.get('result', {}).get('n_by_category')}, {km.get('torch_threads')} threads, {entry.get('date')}")
    return 0
