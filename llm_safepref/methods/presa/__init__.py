"""PRESA (Gong, Varakantham, Kumar, AAMAS 2026): preferences + a Lagrangian safety-label constraint.

``config.py``: :class:`PresaConfig`; ``trainer.py``: :class:`PresaTrainer` and
:class:`PresaDataCollator`, a short subclass of :mod:`llm_safepref.methods.base`. Recipe:
``recipes/presa_lora.py``; docs: ``docs/presa.md``. Names load on first use.
"""

from __future__ import annotations

from llm_safepref._runtime import lazy_exports

_LAZY = {
    "PresaConfig": "llm_safepref.methods.presa.config",
    "PresaTrainer": "llm_safepref.methods.presa.trainer",
    "PresaDataCollator": "llm_safepref.methods.presa.trainer",
    "LAGRANGE_FILE": "llm_safepref.methods.base.trainer",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
