"""What every preference-with-labels trainer shares (see ``docs/methods_layout.md``).

* :class:`LabelledPreferenceConfig` (``config.py``): TRL's ``DPOConfig`` with CPU-friendly
  defaults, DPO's loss options refused, the Lagrange multiplier's fields.
* :class:`LabelledPreferenceTrainer` (``trainer.py``): label columns kept and collated
  (:class:`LabelledPreferenceCollator`), one policy + one reference forward giving ``(2B,)``
  sums (:class:`PairForward`), the MoE auxiliary loss, the input-conditioning hook, the
  optional multiplier, batched metrics.
* :class:`LagrangeCallback` (``callback.py``): the multiplier, its per-step update and its
  checkpointed state; :class:`BatchSums` (``metrics.py``): one reduction per micro-batch.

Names load on first use, so ``import llm_safepref.methods.base`` imports neither trl nor
transformers.
"""

from __future__ import annotations

from llm_safepref._runtime import lazy_exports

_LAZY = {
    "LabelledPreferenceConfig": "llm_safepref.methods.base.config",
    "LabelledPreferenceTrainer": "llm_safepref.methods.base.trainer",
    "LabelledPreferenceCollator": "llm_safepref.methods.base.trainer",
    "PairForward": "llm_safepref.methods.base.trainer",
    "LAGRANGE_FILE": "llm_safepref.methods.base.trainer",
    "LagrangeCallback": "llm_safepref.methods.base.callback",
    "BatchSums": "llm_safepref.methods.base.metrics",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
