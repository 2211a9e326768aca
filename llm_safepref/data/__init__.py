"""Safety data: prompt sources, splits, the offline benchmark build, adapters and validation.

Public API (kept stable for the trainers and recipes):

* ``load_preference_dataset(name_or_path="embedded", split="train", *, conversational=False, drop_invalid=False,
  max_length=None, tokenizer=None)``
* ``validate_preference_dataset(ds, *, source_name, max_length=None, tokenizer=None, drop_invalid=False)``:
  ``llm_safepref.data_checks``' one row check, the same the trainers run (``check_presa_dataset``)
* ``load_safety_labels(name_or_path="embedded", split="train", *, drop_invalid=False)``
* ``load_eval_prompts(name_or_path="embedded", split="test")``
* ``build_benchmark(BuildConfig(...))`` / ``python -m llm_safepref.data build`` (finds the build shipped
  with the package, ``packaged_benchmark_dir()``; ``benchmark_folder()`` is what ``"embedded"`` reads;
  ``build --verify`` rebuilds and compares byte for byte)
"""

from llm_safepref.data.adapters import (
    PKU_SAFERLHF_COLUMNS,
    DataValidationError,
    load_eval_prompts,
    load_preference_dataset,
    load_safety_labels,
    read_dataset,
    validate_preference_dataset,
)
from llm_safepref.data.build import (
    BENCHMARK_VERSION,
    BuildConfig,
    benchmark_dir,
    benchmark_folder,
    build_benchmark,
    is_built,
    packaged_benchmark_dir,
)

__all__ = [
    "BENCHMARK_VERSION",
    "BuildConfig",
    "DataValidationError",
    "PKU_SAFERLHF_COLUMNS",
    "benchmark_dir",
    "benchmark_folder",
    "build_benchmark",
    "is_built",
    "load_eval_prompts",
    "load_preference_dataset",
    "load_safety_labels",
    "packaged_benchmark_dir",
    "read_dataset",
    "validate_preference_dataset",
]
