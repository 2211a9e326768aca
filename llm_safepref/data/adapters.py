"""Load and validate preference / safety-label data from the built benchmark, local files or the Hub.

Recognised schemas (by columns):

* generic: ``prompt, chosen, rejected`` + ``chosen_is_safe, rejected_is_safe`` (optional ``source``);
  the label columns may also be called ``is_chosen_safe / is_rejected_safe``.
* PKU-SafeRLHF: ``prompt, response_0, response_1, better_response_id, is_response_0_safe,
  is_response_1_safe`` (+ ``safer_response_id`` etc., ignored): chosen = the better response.
* Conversational (TRL): ``prompt`` a list of messages, ``chosen``/``rejected`` lists with one
  assistant message; validated on their text, converted to plain text or back when asked.

Design decisions:

* Validation is :mod:`llm_safepref.data_checks`' one row check, the same the trainers run:
  the same row gets the same verdict from ``validate_preference_dataset`` and from
  ``check_presa_dataset``, and the label-balance warning is given once per set of rows.
  *Errors*: missing columns, labels that are not booleans, empty prompts or responses
  (whitespace-only or an empty assistant message included), prompts longer than
  ``max_length`` tokens; each names the file, the row (0-based, as ``datasets`` indexes rows)
  and the column (and the file's own column when it was renamed or converted from
  PKU-SafeRLHF). ``drop_invalid=True`` drops such rows with one ``UserWarning`` naming them.
* A label is ``true``/``false``. CSV has no booleans, so the label columns of a CSV file are
  decoded when read (``true/false``, ``yes/no``, ``1/0``, any case); JSON, Parquet, saved
  datasets and Hub datasets must carry real booleans.
* A ``.jsonl`` file that ``datasets`` cannot parse is scanned line by line, so the error names
  the 1-based line and what is wrong with it instead of a bare ``DatasetGenerationError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llm_safepref.core.schema import CHOSEN, CHOSEN_IS_SAFE, PROMPT, REJECTED, REJECTED_IS_SAFE
from llm_safepref.data_checks import (
    REQUIRED_COLUMNS,
    DataValidationError,
    RowCheck,
    check_columns,
    check_rows,
    is_label,
    text_of,
    warn_dropped_invalid,
    warn_label_balance,
)

__all__ = [
    "DataValidationError",
    "PKU_SAFERLHF_COLUMNS",
    "load_preference_dataset",
    "validate_preference_dataset",
    "load_safety_labels",
    "load_eval_prompts",
    "read_dataset",
]

PKU_SAFERLHF_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "is_response_0_safe", "is_response_1_safe")
PAIR_COLUMNS = (*REQUIRED_COLUMNS, "source")
_LABEL_ALIASES = {"is_chosen_safe": CHOSEN_IS_SAFE, "is_rejected_safe": REJECTED_IS_SAFE}
#: Label columns of every schema, decoded from text when read from a CSV file.
_LABEL_COLUMN_NAMES = (*_LABEL_ALIASES, CHOSEN_IS_SAFE, REJECTED_IS_SAFE, "is_response_0_safe", "is_response_1_safe",
                       "is_safe")
_BOOL_TEXT = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
_TEXT_FORMATS = (".csv",)


# --------------------------------------------------------------------------- reading

def _json_line_problem(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not one JSON object: ``"line N: ..."`` (1-based)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: not valid JSON ({err.msg}): {line.strip()[:80]!r}"
            if not isinstance(obj, dict):
                return (f"line {number}: expected one JSON object (a row) per line, got a JSON "
                        f"{type(obj).__name__}: {line.strip()[:80]!r}")
    return None


def _read_json_lines(path: Path):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except DatasetGenerationError as err:
        problem = _json_line_problem(path)
        if problem is not None:
            raise DataValidationError(f"{path}: {problem}") from err
        raise DataValidationError(f"{path}: could not be read as JSON lines: {err.__cause__ or err}") from err


def read_dataset(name_or_path: str, split: str):
    """A ``datasets.Dataset`` from a local file (.jsonl, .json, .csv, .parquet), a ``save_to_disk`` folder or a Hub id; errors name the file and line."""
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
        if suffix == ".jsonl":
            return _read_json_lines(path)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                if err.msg == "Extra data":  # one object per line in a .json file
                    return _read_json_lines(path)
                raise DataValidationError(
                    f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from err
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


def _decode_text_label(value):
    """A CSV cell of a label column as a bool (``true/false``, ``yes/no``, ``1/0``); other values unchanged."""
    if is_label(value):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    if isinstance(value, (int, np.integer)) and value in (0, 1):  # pandas reads a 0/1 column as ints
        return bool(value)
    return value


def _label_column(ds, column: str, text_labels: bool) -> list:
    values = list(ds[column])
    return [_decode_text_label(v) for v in values] if text_labels else values


def _is_pku(column_names) -> bool:
    return set(PKU_SAFERLHF_COLUMNS) <= set(column_names)


def _pku_hint(column_names) -> str:
    missing = [c for c in PKU_SAFERLHF_COLUMNS if c not in column_names]
    return f" (or the PKU-SafeRLHF schema {list(PKU_SAFERLHF_COLUMNS)}, missing {missing})"


# --------------------------------------------------------------------------- validation

def _with_labels(ds, check: RowCheck, columns: dict):
    """``ds`` restricted to the kept rows, with the label columns as plain ``bool``."""
    if check.errors:
        ds = ds.select(check.keep)
    for column in (CHOSEN_IS_SAFE, REJECTED_IS_SAFE):
        ds = ds.remove_columns(column).add_column(column, [bool(columns[column][i]) for i in check.keep])
    return ds


def _run_checks(columns: dict, *, name: str, max_length, tokenizer, drop_invalid: bool, origin=None,
                invalid=None) -> RowCheck:
    n = len(columns[PROMPT])
    if n == 0:
        raise DataValidationError(f"{name}: it has no rows")
    check = check_rows(columns, name=name, drop_invalid=drop_invalid, max_length=max_length, tokenizer=tokenizer,
                       origin=origin, invalid=invalid)
    if not check.keep:
        first = check.errors[min(check.errors)]
        raise DataValidationError(f"{name}: no valid rows: all {n} rows are invalid; the first: {first}")
    warn_dropped_invalid(check, name=name)
    warn_label_balance(check, name=name)
    return check


def validate_preference_dataset(ds, *, source_name: str, max_length: int | None = None, tokenizer=None,
                                drop_invalid: bool = False):
    """Check every row (``llm_safepref.data_checks.check_rows``); return ``(dataset, n_dropped)``.

    Raises ``DataValidationError`` (file, row, column, expectation) unless ``drop_invalid``, in
    which case the invalid rows are dropped with one ``UserWarning`` naming them. The label
    columns come back as plain ``bool``. Warns when no response is unsafe or none is safe.
    """
    check_columns(ds.column_names, name=source_name, hint=_pku_hint(ds.column_names))
    columns = {c: list(ds[c]) for c in REQUIRED_COLUMNS}
    check = _run_checks(columns, name=source_name, max_length=max_length, tokenizer=tokenizer,
                        drop_invalid=drop_invalid)
    return _with_labels(ds, check, columns), check.n_dropped


def _load_generic(ds, name: str, *, text_labels: bool, **checks):
    renames = {a: b for a, b in _LABEL_ALIASES.items() if a in ds.column_names and b not in ds.column_names}
    if renames:
        ds = ds.rename_columns(renames)
    check_columns(ds.column_names, name=name, hint=_pku_hint(ds.column_names))
    if "source" not in ds.column_names:
        ds = ds.add_column("source", [Path(name).name] * len(ds))
    columns = {c: list(ds[c]) for c in (PROMPT, CHOSEN, REJECTED)}
    columns.update({c: _label_column(ds, c, text_labels) for c in (CHOSEN_IS_SAFE, REJECTED_IS_SAFE)})
    from_alias = {b: a for a, b in renames.items()}
    check = _run_checks(columns, name=name, origin=lambda row, column: from_alias.get(column), **checks)
    return _with_labels(ds, check, columns), check.n_dropped


def _load_pku(ds, name: str, *, text_labels: bool, **checks):
    """PKU-SafeRLHF → generic pairs (chosen = ``better_response_id``), checked like any pairs."""
    import datasets

    better_ids = list(ds["better_response_id"])
    responses = [list(ds["response_0"]), list(ds["response_1"])]
    safe = [_label_column(ds, "is_response_0_safe", text_labels), _label_column(ds, "is_response_1_safe", text_labels)]
    columns = {c: [] for c in REQUIRED_COLUMNS}
    columns[PROMPT] = list(ds["prompt"])
    invalid, better_of = {}, []
    for row, better in enumerate(better_ids):
        if better not in (0, 1, "0", "1") or isinstance(better, bool):
            invalid[row] = f"{name}: row {row}, column 'better_response_id': expected 0 or 1, got {better!r}"
            better = 0  # placeholder; the row is reported (or dropped) by the check
        b = int(better)
        better_of.append(b)
        columns[CHOSEN].append(responses[b][row])
        columns[REJECTED].append(responses[1 - b][row])
        columns[CHOSEN_IS_SAFE].append(safe[b][row])
        columns[REJECTED_IS_SAFE].append(safe[1 - b][row])

    def origin(row: int, column: str) -> str | None:
        b = better_of[row]
        return {CHOSEN: f"response_{b}", REJECTED: f"response_{1 - b}", CHOSEN_IS_SAFE: f"is_response_{b}_safe",
                REJECTED_IS_SAFE: f"is_response_{1 - b}_safe"}.get(column)

    check = _run_checks(columns, name=name, origin=origin, invalid=invalid, **checks)
    kept = {c: [columns[c][i] for i in check.keep] for c in REQUIRED_COLUMNS}
    kept[CHOSEN_IS_SAFE] = [bool(v) for v in kept[CHOSEN_IS_SAFE]]
    kept[REJECTED_IS_SAFE] = [bool(v) for v in kept[REJECTED_IS_SAFE]]
    kept["source"] = ["pku_saferlhf"] * len(check.keep)
    return datasets.Dataset.from_dict(kept), check.n_dropped


def _is_text_format(path: str) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in _TEXT_FORMATS


# --------------------------------------------------------------------------- public loaders

def _embedded_folder(name: str) -> Path:
    """``name``'s part of the folder ``"embedded"`` names (``build.benchmark_folder``: the env
    override, a cache build, else the build shipped with the package)."""
    from llm_safepref.data.build import benchmark_folder, is_built

    folder = benchmark_folder()
    if not is_built(folder):
        raise FileNotFoundError(
            f"the embedded safety benchmark is not built at {folder}; build it once with "
            "`python -m llm_safepref.data build` (about 16–24 min on a 2-core CPU; cached afterwards), "
            "or point LLM_SAFEPREF_BENCHMARK_DIR at a built folder"
        )
    return folder / name


def _build_part(folder: Path, dataset: str, split: str) -> Path:
    """A build's ``dataset`` (``pairs``, ``safety_labels``, ...): its ``save_to_disk`` folder when
    there is one (a cache build), else its ``jsonl/<dataset>_<split>.jsonl`` (a shipped build, which
    has no Arrow folders: read as JSON lines, nothing is written next to it)."""
    arrow = folder / dataset
    if arrow.is_dir():
        return arrow
    jsonl = folder / "jsonl" / f"{dataset}_{split}.jsonl"
    if jsonl.is_file():
        return jsonl
    have = sorted(p.name[len(dataset) + 1 : -len(".jsonl")] for p in (folder / "jsonl").glob(f"{dataset}_*.jsonl"))
    raise DataValidationError(f"{folder}: no split {split!r} of {dataset!r}; available: {have}")


def _resolve(name_or_path, dataset: str, split: str) -> tuple[str, str]:
    """(path-or-hub-id, display name). ``embedded`` or a build folder → its ``dataset`` for ``split``."""
    name = str(name_or_path)
    if name == "embedded":
        p = _build_part(_embedded_folder(dataset).parent, dataset, split)
        return str(p), str(p)
    if Path(name).is_dir() and (Path(name) / "manifest.json").exists():  # a build folder
        p = _build_part(Path(name), dataset, split)
        return str(p), str(p)
    return name, name


def load_preference_dataset(name_or_path="embedded", split: str = "train", *, conversational: bool = False,
                            drop_invalid: bool = False, max_length: int | None = None, tokenizer=None):
    """Pairs with ``prompt, chosen, rejected, chosen_is_safe, rejected_is_safe, source``, validated.

    ``conversational=True`` returns TRL conversational rows (message lists). ``drop_invalid``
    drops invalid rows (one ``UserWarning`` naming them) instead of raising on the first;
    ``max_length`` (with ``tokenizer``) bounds the prompt's token count.
    """
    path, display = _resolve(name_or_path, "pairs", split)
    raw = read_dataset(path, split)
    load = _load_pku if _is_pku(raw.column_names) else _load_generic
    ds, _ = load(raw, display, text_labels=_is_text_format(path), max_length=max_length, tokenizer=tokenizer,
                 drop_invalid=drop_invalid)
    is_conv = isinstance(ds[0][PROMPT], list)
    if conversational and not is_conv:
        ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    elif not conversational and is_conv:
        ds = ds.map(lambda r: {"prompt": text_of(r["prompt"]), "chosen": text_of(r["chosen"]),
                               "rejected": text_of(r["rejected"])})
    keep = [c for c in PAIR_COLUMNS if c in ds.column_names]
    return ds.select_columns(keep)


def load_safety_labels(name_or_path="embedded", split: str = "train", *, drop_invalid: bool = False):
    """Unpaired safety labels: ``prompt, completion, is_safe`` (+ ``label_source, source`` when present).

    The same rules as the pairs: non-empty texts, a boolean ``is_safe`` (decoded from text in a
    CSV file); ``drop_invalid`` drops invalid rows with one ``UserWarning`` naming them.
    """
    path, display = _resolve(name_or_path, "safety_labels", split)
    ds = read_dataset(path, split)
    missing = [c for c in ("prompt", "completion", "is_safe") if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{display}: missing column(s) {missing}; expected prompt, completion, is_safe; found {ds.column_names}")
    prompts, completions = list(ds["prompt"]), list(ds["completion"])
    labels = _label_column(ds, "is_safe", _is_text_format(path))
    check = RowCheck(rows=len(ds), keep=[])
    for row in range(len(ds)):
        problem = None
        for column, value in (("prompt", prompts[row]), ("completion", completions[row])):
            if not text_of(value).strip():
                problem = f"{display}: row {row}, column {column!r}: expected a non-empty text, got {value!r}"
                break
        if problem is None and not is_label(labels[row]):
            problem = (f"{display}: row {row}, column 'is_safe': expected a boolean (true / false; True = safe), "
                       f"got {labels[row]!r} of type {type(labels[row]).__name__}")
        if problem is not None:
            if not drop_invalid:
                raise DataValidationError(problem)
            check.errors[row] = problem
            continue
        check.keep.append(row)
    if not check.keep:
        raise DataValidationError(f"{display}: no valid rows")
    warn_dropped_invalid(check, name=display)
    if check.errors:
        ds = ds.select(check.keep)
    return ds.remove_columns(["is_safe"]).add_column("is_safe", [bool(labels[i]) for i in check.keep])


def load_eval_prompts(name_or_path="embedded", split: str = "test"):
    """Evaluation prompts: ``id, prompt, category`` (harmful / benign / look_dangerous, and from
    safety-v3 on contrast_harmful), ``source``, ``constraints`` (JSON list of verifiable constraints;
    ``[]`` except for benign prompts); safety-v3 builds add ``subcategory`` and ``pair_id`` (``""``
    except for the v3 over-refusal prompts)."""
    path, display = _resolve(name_or_path, "eval_prompts", split)
    ds = read_dataset(path, split)
    missing = [c for c in ("id", "prompt", "category", "constraints") if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{display}: missing column(s) {missing}; expected id, prompt, category, constraints")
    return ds
