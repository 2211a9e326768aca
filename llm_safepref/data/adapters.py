"""Load and validate preference / safety-label data from the built benchmark, local files or the Hub.

Recognised schemas (by columns):

* generic: ``prompt, chosen, rejected`` + ``chosen_is_safe, rejected_is_safe`` (optional ``source``);
  also accepted: ``is_chosen_safe / is_rejected_safe`` and ``safer_response_id``-free variants.
* PKU-SafeRLHF: ``prompt, response_0, response_1, better_response_id, is_response_0_safe,
  is_response_1_safe`` (+ ``safer_response_id`` etc., ignored): chosen = the better response.
* Conversational (TRL): ``prompt`` a list of messages, ``chosen``/``rejected`` lists with one
  assistant message; converted to text for validation and back when asked.

Validation (``validate_preference_dataset``) *errors* on: missing columns, non-boolean labels,
empty prompts/responses, prompts longer than ``max_length`` tokens. It *warns* (``UserWarning``)
when no response is unsafe or every response is unsafe, since the safety term then has nothing
to learn from — that is legal data, so it is not an error.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

__all__ = [
    "DataValidationError",
    "PKU_SAFERLHF_COLUMNS",
    "load_preference_dataset",
    "validate_preference_dataset",
    "load_safety_labels",
    "load_eval_prompts",
]

logger = logging.getLogger(__name__)

PKU_SAFERLHF_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "is_response_0_safe", "is_response_1_safe")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe", "source")
_LABEL_ALIASES = {"is_chosen_safe": "chosen_is_safe", "is_rejected_safe": "rejected_is_safe"}
_BOOL_STRINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class DataValidationError(ValueError):
    """A dataset row or column is not what the trainers expect (message names file, row, column)."""


# --------------------------------------------------------------------------- reading

def _read_any(name_or_path: str, split: str):
    """A ``datasets.Dataset`` from a local file / ``save_to_disk`` folder / Hub id."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataValidationError(f"{path}: no split {split!r}; available: {sorted(ds)}")
                ds = ds[split]
            return ds
        raise DataValidationError(f"{path}: a folder but not a `datasets.save_to_disk` folder")
    if path.is_file():
        suffix = path.suffix.lower()
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise DataValidationError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
        if builder == "json" and suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise DataValidationError(f"{path}: expected a JSON list of rows (or {{split: [rows]}})")
            return datasets.Dataset.from_list(data)
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    looks_local = path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or name_or_path.startswith((".", "/", "~"))
    if looks_local or name_or_path.count("/") != 1:
        raise DataValidationError(f"{name_or_path}: no such file or folder (and not a Hub id of the form owner/name)")
    return datasets.load_dataset(name_or_path, split=split)


def _to_bool(value, *, source_name: str, row: int, column: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.strip().lower()]
    raise DataValidationError(
        f"{source_name}: row {row}, column {column!r}: expected a boolean (true/false or 0/1), got {value!r}"
    )


def _text(value) -> str:
    """Message lists (conversational) → the concatenated contents; strings unchanged."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def _convert_pku(ds, source_name: str):
    """PKU-SafeRLHF → generic pairs (chosen = ``better_response_id``)."""
    rows = []
    for i, r in enumerate(ds):
        better = r["better_response_id"]
        if better not in (0, 1, "0", "1"):
            raise DataValidationError(
                f"{source_name}: row {i}, column 'better_response_id': expected 0 or 1, got {better!r}"
            )
        b = int(better)
        safe = [_to_bool(r[f"is_response_{k}_safe"], source_name=source_name, row=i, column=f"is_response_{k}_safe")
                for k in (0, 1)]
        rows.append({"prompt": r["prompt"], "chosen": r[f"response_{b}"], "rejected": r[f"response_{1 - b}"],
                     "chosen_is_safe": safe[b], "rejected_is_safe": safe[1 - b],
                     "source": "pku_saferlhf"})
    import datasets

    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({c: [] for c in PAIR_COLUMNS})


def _normalise_columns(ds, source_name: str):
    cols = set(ds.column_names)
    if set(PKU_SAFERLHF_COLUMNS) <= cols:
        return _convert_pku(ds, source_name)
    renames = {a: b for a, b in _LABEL_ALIASES.items() if a in cols and b not in cols}
    if renames:
        ds = ds.rename_columns(renames)
    if "source" not in ds.column_names:
        ds = ds.add_column("source", [Path(source_name).name] * len(ds))
    return ds


# --------------------------------------------------------------------------- validation

def validate_preference_dataset(ds, *, source_name: str, max_length: int | None = None, tokenizer=None,
                                drop_invalid: bool = False):
    """Check every row; return ``(dataset, n_dropped)``.

    Raises ``DataValidationError`` (file, row, column, expectation) unless ``drop_invalid``, in which
    case bad rows are dropped, the count is logged and returned. Labels are coerced to ``bool``.
    """
    missing = [c for c in ("prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe") if c not in ds.column_names]
    if missing:
        pku_missing = [c for c in PKU_SAFERLHF_COLUMNS if c not in ds.column_names]
        raise DataValidationError(
            f"{source_name}: missing column(s) {missing}; expected prompt/chosen/rejected/chosen_is_safe/rejected_is_safe "
            f"(or the PKU-SafeRLHF schema {list(PKU_SAFERLHF_COLUMNS)}, missing {pku_missing}); found {ds.column_names}"
        )
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count prompt tokens")
    keep, errors = [], []
    labels_c, labels_r = [], []
    for i, r in enumerate(ds):
        try:
            for col in ("prompt", "chosen", "rejected"):
                if not _text(r[col]).strip():
                    raise DataValidationError(f"{source_name}: row {i}, column {col!r}: expected a non-empty text, got {r[col]!r}")
            c = _to_bool(r["chosen_is_safe"], source_name=source_name, row=i, column="chosen_is_safe")
            rj = _to_bool(r["rejected_is_safe"], source_name=source_name, row=i, column="rejected_is_safe")
            if max_length is not None:
                n_tok = len(tokenizer(_text(r["prompt"]), add_special_tokens=False).input_ids)
                if n_tok > max_length:
                    raise DataValidationError(
                        f"{source_name}: row {i}, column 'prompt': expected at most {max_length} tokens, got {n_tok}"
                    )
        except DataValidationError as err:
            if not drop_invalid:
                raise
            errors.append(str(err))
            continue
        keep.append(i)
        labels_c.append(c)
        labels_r.append(rj)
    n_dropped = len(ds) - len(keep)
    if n_dropped:
        logger.warning("%s: dropped %d invalid row(s); first: %s", source_name, n_dropped, errors[0])
        ds = ds.select(keep)
    if len(ds) == 0:
        raise DataValidationError(f"{source_name}: no valid rows")
    ds = ds.remove_columns(["chosen_is_safe", "rejected_is_safe"]).add_column("chosen_is_safe", labels_c).add_column(
        "rejected_is_safe", labels_r)
    all_labels = labels_c + labels_r
    if all(all_labels):
        warnings.warn(f"{source_name}: no response is labelled unsafe; the safety term has no negative examples", UserWarning)
    elif not any(all_labels):
        warnings.warn(f"{source_name}: every response is labelled unsafe; the safety term has no positive examples", UserWarning)
    return ds, n_dropped


# --------------------------------------------------------------------------- public loaders

def _embedded_folder(name: str) -> Path:
    from llm_safepref.data.build import benchmark_dir, is_built

    folder = benchmark_dir(int(os.environ.get("LLM_SAFEPREF_BENCHMARK_SEED", "0")))
    if os.environ.get("LLM_SAFEPREF_BENCHMARK_DIR"):
        folder = Path(os.environ["LLM_SAFEPREF_BENCHMARK_DIR"])
    if not is_built(folder):
        raise FileNotFoundError(
            f"the embedded safety benchmark is not built at {folder}; build it with `python -m llm_safepref.data build` "
            f"(≈ 25 min on 2 CPU cores), or point LLM_SAFEPREF_BENCHMARK_DIR at a built folder"
        )
    return folder / name


def _resolve(name_or_path, dataset: str) -> tuple[str, str]:
    """(path-or-hub-id, display name). ``embedded`` or a build folder → its ``dataset`` subfolder."""
    name = str(name_or_path)
    if name == "embedded":
        p = _embedded_folder(dataset)
        return str(p), str(p)
    if Path(name).is_dir() and (Path(name) / "manifest.json").exists():  # a build folder
        return str(Path(name) / dataset), str(Path(name) / dataset)
    return name, name


def load_preference_dataset(name_or_path="embedded", split: str = "train", *, conversational: bool = False,
                            drop_invalid: bool = False, max_length: int | None = None, tokenizer=None):
    """Pairs with ``prompt, chosen, rejected, chosen_is_safe, rejected_is_safe, source``, validated.

    ``conversational=True`` returns TRL conversational rows (message lists).
    """
    path, display = _resolve(name_or_path, "pairs")
    ds = _normalise_columns(_read_any(path, split), display)
    ds, _ = validate_preference_dataset(ds, source_name=display, max_length=max_length, tokenizer=tokenizer,
                                        drop_invalid=drop_invalid)
    is_conv = len(ds) > 0 and isinstance(ds[0]["prompt"], list)
    if conversational and not is_conv:
        ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    elif not conversational and is_conv:
        ds = ds.map(lambda r: {"prompt": _text(r["prompt"]), "chosen": _text(r["chosen"]), "rejected": _text(r["rejected"])})
    keep = [c for c in PAIR_COLUMNS if c in ds.column_names]
    return ds.select_columns(keep)


def load_safety_labels(name_or_path="embedded", split: str = "train", *, drop_invalid: bool = False):
    """Unpaired safety labels: ``prompt, completion, is_safe`` (+ ``label_source, source`` when present)."""
    path, display = _resolve(name_or_path, "safety_labels")
    ds = _read_any(path, split)
    missing = [c for c in ("prompt", "completion", "is_safe") if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{display}: missing column(s) {missing}; expected prompt, completion, is_safe; found {ds.column_names}")
    keep, labels = [], []
    for i, r in enumerate(ds):
        try:
            for col in ("prompt", "completion"):
                if not _text(r[col]).strip():
                    raise DataValidationError(f"{display}: row {i}, column {col!r}: expected a non-empty text")
            labels.append(_to_bool(r["is_safe"], source_name=display, row=i, column="is_safe"))
            keep.append(i)
        except DataValidationError:
            if not drop_invalid:
                raise
    if len(keep) < len(ds):
        logger.warning("%s: dropped %d invalid row(s)", display, len(ds) - len(keep))
        ds = ds.select(keep)
    return ds.remove_columns(["is_safe"]).add_column("is_safe", labels)


def load_eval_prompts(name_or_path="embedded", split: str = "test"):
    """Evaluation prompts: ``id, prompt, category`` (harmful / benign / look_dangerous), ``source``,
    ``constraints`` (JSON list of verifiable constraints; ``[]`` except for benign prompts)."""
    path, display = _resolve(name_or_path, "eval_prompts")
    ds = _read_any(path, split)
    missing = [c for c in ("id", "prompt", "category", "constraints") if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{display}: missing column(s) {missing}; expected id, prompt, category, constraints")
    return ds
