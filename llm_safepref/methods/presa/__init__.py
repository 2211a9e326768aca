"""PRESA (Gong, Varakantham, Kumar, AAMAS 2026): preferences + a Lagrangian safety-label constraint.

``config.py``: :class:`PresaConfig`; ``trainer.py``: :class:`PresaTrainer` and
:class:`PresaDataCollator`, a short subclass of :mod:`llm_safepref.methods.base`. Recipe:
``recipes/presa_lora.py``; docs: ``docs/presa.md``. Names load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PresaConfig": "llm_safepref.methods.presa.config",
    "PresaTrainer": "llm_safepref.methods.presa.trainer",
    "PresaDataCollator": "llm_safepref.methods.presa.trainer",
    "LAGRANGE_FILE": "llm_safepref.methods.base.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
