"""Process-level helpers of the package: lazy public names, and the offline defaults of its tools.

* :func:`lazy_exports` gives a package the module ``__getattr__`` / ``__dir__`` that import a
  public name's module on first use (PEP 562), so ``import llm_safepref`` and the method packages
  stay light until a trainer is asked for.
* :func:`offline_defaults` sets the Hub and tokenizer environment defaults every command-line
  tool runs with (offline unless the user says otherwise, no telemetry, no tokenizer threads
  fighting the torch threads); a value the user set is never overridden.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports", "offline_defaults"]


def lazy_exports(package: str, names: Mapping[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``names`` map to their modules."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *names])

    return __getattr__, __dir__


def offline_defaults(*, offline: bool = True) -> None:
    """Default ``HF_HUB_OFFLINE=1`` (unless ``offline=False``), no telemetry, no tokenizer parallelism."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
