"""The Lagrange multiplier of a trainer, as a transformers callback with exportable state.

Design decisions:

* :class:`LagrangeCallback` owns the :class:`~llm_safepref.core.LagrangeMultiplier`; the
  trainer reads it through the callback (``trainer.multiplier``), never keeps its own copy.
* It is a ``TrainerCallback`` *and* an ``ExportableState``: transformers writes its
  :meth:`state` (the constructor arguments, and the multiplier's ``state_dict()`` as an
  attribute) into every checkpoint's ``trainer_state.json`` under ``stateful_callbacks``, and
  can rebuild it with ``type(cb)(**args)`` + ``setattr`` of the attributes. So it holds NO
  reference to the trainer (a rebuilt one would hold a dead or missing one and lose nu
  silently): everything it needs is in its arguments and its state.
* No communication happens here. The trainer hands it, per micro-batch, sums that are
  already summed over processes (they ride on the trainer's one metric reduction), so at
  ``on_step_end`` every rank divides the same two floats and holds the same nu, bit for bit.
* The values it logs (``lagrange/nu``, ``lagrange/constraint``, ``lagrange/step_prob_mean``)
  wait in :meth:`pop_metrics` until the trainer's next train-mode ``log``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from llm_safepref.core.lagrange import LagrangeMultiplier
from llm_safepref.core.schema import Metric

__all__ = ["LagrangeCallback"]


class LagrangeCallback(TrainerCallback, ExportableState):
    """One projected-ascent step of nu per optimiser step, from the step's all-process mean.

    Args are those of :class:`~llm_safepref.core.LagrangeMultiplier` (``init`` = nu_init).
    Call :meth:`accumulate` once per micro-batch with the all-process ``(sum, weight)`` of the
    constrained quantity; ``on_step_end`` (after gradient accumulation, before log and save)
    moves nu by ``lr * violation(sum / weight)``. A step whose total weight is 0 leaves nu.
    """

    def __init__(self, delta: float, lr: float, init: float, nu_max: float | None, sense: str = "ge"):
        self.multiplier = LagrangeMultiplier(delta=delta, lr=lr, init=init, nu_max=nu_max, sense=sense)
        self._step_sum = 0.0
        self._step_weight = 0.0
        self._pending: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------ exportable state

    def state(self) -> dict[str, Any]:
        m = self.multiplier
        return {
            "args": {"delta": m.delta, "lr": m.lr, "init": m.init, "nu_max": m.nu_max, "sense": m.sense},
            "attributes": {"multiplier_state": m.state_dict()},
        }

    @property
    def multiplier_state(self) -> dict[str, Any]:
        """The multiplier's ``state_dict()``; setting it loads one (how transformers restores it)."""
        return self.multiplier.state_dict()

    @multiplier_state.setter
    def multiplier_state(self, state: dict[str, Any]) -> None:
        self.multiplier.load_state_dict(state)

    def load_state(self, stored: dict[str, Any]) -> None:
        """Load the multiplier state of a stored :meth:`state` (this object's configuration is kept)."""
        try:
            multiplier_state = stored["attributes"]["multiplier_state"]
        except (KeyError, TypeError):
            raise ValueError(
                f"stored {type(self).__name__} state has no attributes.multiplier_state: {stored!r}"
            ) from None
        self.multiplier.load_state_dict(multiplier_state)

    # ------------------------------------------------------------------ per step

    def accumulate(self, total: float, weight: float) -> None:
        """Add one micro-batch's all-process (weighted) sum and total weight."""
        self._step_sum += total
        self._step_weight += weight

    def on_step_end(self, args, state, control, **kwargs):
        total, weight = self._step_sum, self._step_weight
        self._step_sum, self._step_weight = 0.0, 0.0
        if weight <= 0:
            return
        mean = total / weight
        self.multiplier.update(mean)
        self._pending[Metric.NU].append(self.multiplier.value)
        self._pending[Metric.CONSTRAINT].append(self.multiplier.constraint(mean))
        self._pending[Metric.STEP_PROB_MEAN].append(mean)

    def pop_metrics(self) -> dict[str, list[float]]:
        """The values logged since the last call (and forget them)."""
        pending, self._pending = dict(self._pending), defaultdict(list)
        return pending
