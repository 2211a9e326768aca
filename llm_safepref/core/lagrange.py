"""Lagrange multipliers of the constrained objectives, one class for both worlds.

Design decisions:

* One multiplier serves every constraint the learners need. PRESA's safety constraint is
  ``E[p(y | sigma)] >= delta`` (``sense="ge"``, a probability target in [0, 1]); the offline
  safe-RL baselines constrain a cost budget ``E[C] <= kappa`` (``sense="le"``, any finite
  target). The violation is ``delta - x`` or ``x - kappa``; projected ascent moves nu by
  ``lr * violation`` and clips it to ``[0, nu_max]`` (``nu_max=None``: no upper bound).
* :class:`PIDLagrangeMultiplier` is the PID variant of Stooke, Achiam and Abbeel (ICML 2020)
  that OSRL's BCQ-Lag uses: proportional, integral and (positive part of the) derivative
  terms of the violation, the integral kept non-negative.
* The multiplier lives outside the autograd graph (a Python float). Its state is
  :meth:`state_dict`, the same dict in a TRL checkpoint (``lagrange.json`` and the trainer
  state's callback state) and in a control learner's checkpoint.
* :meth:`update` takes an *all-process* mean: it refuses a tensor with more than one
  element, so a forgotten reduction is loud, not a silent divergence between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["LagrangeMultiplier", "PIDLagrangeMultiplier", "as_scalar"]

_SENSES = ("ge", "le")


@dataclass
class LagrangeMultiplier:
    """A dual variable nu >= 0 moved by projected gradient ascent.

    ``sense="ge"`` (PRESA): the constraint is ``E[x] >= delta`` with ``x`` a probability,
    ``update(x)`` does ``nu <- clip(nu + lr * (delta - x), 0, nu_max)``.
    ``sense="le"`` (a cost budget): ``E[x] <= delta``, ``nu <- clip(nu + lr * (x - delta), 0, nu_max)``.
    """

    delta: float
    lr: float = 0.1
    init: float = 1.0
    nu_max: float | None = 100.0
    sense: str = "ge"

    def __post_init__(self) -> None:
        if self.sense not in _SENSES:
            raise ValueError(f"sense must be one of {_SENSES} ('ge': E[x] >= delta, 'le': E[x] <= delta), got {self.sense!r}")
        if not math.isfinite(self.delta):
            raise ValueError(f"delta must be finite, got {self.delta}")
        if self.sense == "ge" and not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must be a probability in [0, 1], got {self.delta}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.nu_max is not None and self.nu_max < 0:
            raise ValueError(f"nu_max must be >= 0, got {self.nu_max}")
        upper = math.inf if self.nu_max is None else self.nu_max
        if not 0.0 <= self.init <= upper:
            raise ValueError(f"init must lie in [0, nu_max={self.nu_max}], got {self.init}")
        self.value: float = float(self.init)
        self.num_updates: int = 0

    @classmethod
    def for_cost_budget(cls, budget: float, *, lr: float = 0.1, init: float = 0.0,
                        nu_max: float | None = None) -> "LagrangeMultiplier":
        """The multiplier of ``E[C] <= budget`` (unbounded by default)."""
        return cls(delta=budget, lr=lr, init=init, nu_max=nu_max, sense="le")

    def __float__(self) -> float:
        return self.value

    @property
    def threshold(self) -> float:
        """The constraint's target (``delta`` or the cost budget ``kappa``)."""
        return self.delta

    def constraint(self, x: float | torch.Tensor) -> float:
        """The violation: ``delta - x`` (``ge``) or ``x - delta`` (``le``); positive while violated."""
        x = as_scalar(x)
        return self.delta - x if self.sense == "ge" else x - self.delta

    def _project(self, value: float) -> float:
        value = max(value, 0.0)
        return value if self.nu_max is None else min(value, self.nu_max)

    def update(self, x: float | torch.Tensor) -> float:
        """One projected ascent step with the batch mean ``x``; returns the new nu."""
        violation = self._checked_violation(x)
        self.value = self._project(self.value + self.lr * violation)
        self.num_updates += 1
        return self.value

    def _checked_violation(self, x: float | torch.Tensor) -> float:
        x = as_scalar(x)
        if not math.isfinite(x):
            raise ValueError(f"constraint value is not finite: {x}")
        return self.constraint(x)

    def state_dict(self) -> dict:
        return {
            "value": self.value,
            "num_updates": self.num_updates,
            "delta": self.delta,
            "lr": self.lr,
            "nu_max": self.nu_max,
            "sense": self.sense,
        }

    def load_state_dict(self, state: Mapping) -> None:
        # The value and the step count are state; delta / lr / nu_max are configuration and
        # keep the values this object was built with (a resumed run may change them).
        if state.get("sense", self.sense) != self.sense:
            raise ValueError(f"state of a {state['sense']!r} multiplier loaded into a {self.sense!r} one")
        self.value = float(state["value"])
        self.num_updates = int(state.get("num_updates", 0))


@dataclass
class PIDLagrangeMultiplier(LagrangeMultiplier):
    """PID Lagrangian (Stooke et al., ICML 2020), as offline safe RL's BCQ-Lag uses it.

    With ``e_t`` the violation, ``I_t = max(0, I_{t-1} + e_t)`` and ``D_t = max(0, e_t - e_{t-1})``:
    ``nu_t = clip(kp * e_t + ki * I_t + kd * D_t, 0, nu_max)``. ``lr`` is unused (the gains
    set the step); OSRL's gains are kp 0.1, ki 0.003, kd 0.001.
    """

    kp: float = 0.1
    ki: float = 0.003
    kd: float = 0.001
    sense: str = "le"

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.kp, self.ki, self.kd) < 0:
            raise ValueError(f"PID gains must be >= 0, got kp={self.kp}, ki={self.ki}, kd={self.kd}")
        self.integral: float = 0.0
        self.last_violation: float | None = None

    def update(self, x: float | torch.Tensor) -> float:
        e = self._checked_violation(x)
        self.integral = max(0.0, self.integral + e)
        derivative = 0.0 if self.last_violation is None else max(0.0, e - self.last_violation)
        self.last_violation = e
        self.value = self._project(self.kp * e + self.ki * self.integral + self.kd * derivative)
        self.num_updates += 1
        return self.value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral, "last_violation": self.last_violation,
                "kp": self.kp, "ki": self.ki, "kd": self.kd}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.integral = float(state.get("integral", 0.0))
        last = state.get("last_violation")
        self.last_violation = None if last is None else float(last)


def as_scalar(x: float | torch.Tensor) -> float:
    """A Python float from a float or a one-element tensor (a larger tensor is an error)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(
                f"expected a scalar batch mean, got a tensor of shape {tuple(x.shape)}; "
                "reduce it (across processes too) before updating the multiplier"
            )
        return float(x.detach().item())
    return float(x)
