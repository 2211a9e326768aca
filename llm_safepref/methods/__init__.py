"""One folder per training method, each on the shared base (the layout PEFT uses for its tuners).

* ``base/``: :class:`~llm_safepref.methods.base.LabelledPreferenceConfig` and
  :class:`~llm_safepref.methods.base.LabelledPreferenceTrainer`, what every
  preference-with-labels trainer shares (``docs/methods_layout.md``).
* ``presa/``: :class:`~llm_safepref.methods.presa.PresaConfig` and
  :class:`~llm_safepref.methods.presa.PresaTrainer` (recipe ``recipes/presa_lora.py``,
  docs ``docs/presa.md``).
* ``safe_cpl/``: :class:`~llm_safepref.methods.safe_cpl.SafeCPLConfig` and
  :class:`~llm_safepref.methods.safe_cpl.SafeCPLTrainer` (docs ``docs/safe_cpl.md``).

A new method goes in ``llm_safepref/methods/<name>/`` with ``config.py`` (a
``LabelledPreferenceConfig`` subclass) and ``trainer.py`` (a ``LabelledPreferenceTrainer``
subclass), is listed in :data:`METHODS`, and gets a recipe in ``recipes/`` and a page in
``docs/``. Importing this package loads no trainer: :func:`get_method` imports one on request.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["METHODS", "Method", "get_method"]


@dataclass(frozen=True)
class Method:
    """Where a method lives: ``"module:Class"`` of its config and of its trainer."""

    name: str
    config: str
    trainer: str
    summary: str

    def load(self) -> tuple[type, type]:
        """``(ConfigClass, TrainerClass)``, imported now."""
        return _load(self.config), _load(self.trainer)


def _load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


#: Every method with a trainer, by name.
METHODS: dict[str, Method] = {
    "presa": Method(
        name="presa",
        config="llm_safepref.methods.presa.config:PresaConfig",
        trainer="llm_safepref.methods.presa.trainer:PresaTrainer",
        summary="PRESA: CPL/DPO preferences + a Lagrangian constraint on per-response safety labels",
    ),
    "safe_cpl": Method(
        name="safe_cpl",
        config="llm_safepref.methods.safe_cpl.config:SafeCPLConfig",
        trainer="llm_safepref.methods.safe_cpl.trainer:SafeCPLTrainer",
        summary="Safe-CPL stage 1: a policy conditioned on a latent user z (soft prompt) learned from crowd "
        "preferences, z inferred from the user's other pairs (VPL encoder, KL to the prior)",
    ),
}


def get_method(name: str) -> tuple[type, type]:
    """``(ConfigClass, TrainerClass)`` of a method; ``ValueError`` listing the valid names."""
    try:
        method = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid names: {', '.join(sorted(METHODS))}") from None
    return method.load()
