"""llm_safepref: align language models to be safe from preferences and safety labels.

``import llm_safepref`` is cheap: the trainers are loaded on first use (module
``__getattr__``), so ``from llm_safepref import PresaTrainer, PresaConfig`` works and
``import llm_safepref.core`` loads only torch and numpy.

* :mod:`llm_safepref.core`: the loss core, multiplier, latent math, statistics and run
  records shared with ``control/``.
* :mod:`llm_safepref.methods`: one folder per method (``presa/``; ``base/`` holds what every
  preference-with-labels trainer shares).
* :mod:`llm_safepref.data`, :mod:`llm_safepref.eval`, :mod:`llm_safepref.judge`: the offline
  safety benchmark; :mod:`llm_safepref.recipes`: the recipes' shared plumbing;
  :mod:`llm_safepref.publish`: model cards and Hub publishing.
"""

from __future__ import annotations

from llm_safepref._runtime import lazy_exports

__version__ = "0.1.0"

#: Public names loaded lazily: name -> module.
_LAZY = {
    "PresaConfig": "llm_safepref.methods.presa.config",
    "PresaTrainer": "llm_safepref.methods.presa.trainer",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
