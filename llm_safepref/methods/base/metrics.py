"""Per-micro-batch metric sums, reduced across processes in one call.

Design decisions:

* A logged metric is a global-batch mean, ``sum over every process of x / count``. Each
  micro-batch records only sums and counts (0-d tensors, detached), stacks them into ONE
  ``(n,)`` tensor, reduces it with ONE ``accelerator.reduce(..., "sum")`` and reads it back
  with ONE ``.tolist()``: one collective and one host sync per micro-batch, whatever the
  number of metrics (TRL's DPOTrainer does a gather and an ``.item()`` per metric).
* Sums are taken in the tensor's own dtype (float32 in full precision; half precision is
  summed in float32) and the stack is float64 where the device has it, so a cross-process sum
  adds no rounding of its own. Division happens on the host, in float64.
* Besides metrics (``name -> numerator / denominator``, skipped when the denominator is 0)
  the same stack carries *raw* all-process sums for the trainer's own use: the Lagrange
  multiplier's weighted constraint sums and the token count. They cost no extra collective.
* Under distributed evaluation ``reduce`` counts the samples accelerate repeats to even out
  the last batch (``gather_for_metrics`` would drop them): a difference only in the last
  eval batch of a dataset that does not divide evenly, and never in training.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["BatchSums", "CONSTRAINT_SUM", "CONSTRAINT_WEIGHT", "NUM_TOKENS"]

#: Raw keys: the all-process (weighted) sum of the constrained quantity and its total weight.
CONSTRAINT_SUM = "constraint/sum"
CONSTRAINT_WEIGHT = "constraint/weight"
#: Raw key: attention-mask tokens of the micro-batch, all processes.
NUM_TOKENS = "num_tokens"


def _scalar(x: torch.Tensor | float) -> torch.Tensor | float:
    # A detached 0-d tensor (half precision promoted to float32), or a host float as it is.
    if not isinstance(x, torch.Tensor):
        return float(x)
    x = x.detach()
    if x.numel() != 1:
        raise ValueError(f"expected a 0-d sum or count, got a tensor of shape {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.reshape(())


class BatchSums:
    """Named sums and counts of one micro-batch; :meth:`reduce` makes them global means.

    ``mean(name, x)`` logs the global mean of the elements of ``x``; ``ratio(name, num, den)``
    logs ``sum(num) / sum(den)`` over processes; ``raw(key, value)`` returns the all-process
    sum of ``value`` unlogged.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, str, torch.Tensor | float]] = []  # (kind, name, 0-d tensor or float)

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, kind: str, name: str, value: torch.Tensor | float) -> None:
        self._entries.append((kind, name, _scalar(value)))

    def mean(self, name: str, values: torch.Tensor) -> None:
        """Log the global mean of every element of ``values`` (any shape)."""
        values = values.detach()
        if values.dtype == torch.bool:
            values = values.float()
        elif values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        self._add("num", name, values.sum())
        self._add("den", name, float(values.numel()))

    def ratio(self, name: str, numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> None:
        """Log ``sum over processes of numerator / sum of denominator`` (nothing when that is 0)."""
        if isinstance(numerator, torch.Tensor) and numerator.dtype == torch.bool:
            numerator = numerator.float()
        if isinstance(denominator, torch.Tensor) and not denominator.is_floating_point():
            denominator = denominator.float()
        self._add("num", name, numerator)
        self._add("den", name, denominator)

    def raw(self, key: str, value: torch.Tensor | float) -> None:
        """An all-process sum returned by :meth:`reduce` but not logged."""
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            value = value.float()
        self._add("raw", key, value)

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
        """ONE ``reduce_sum`` of the stacked sums, ONE host sync; returns ``(metrics, raw)``.

        ``reduce_sum`` sums a tensor over processes (``lambda t: accelerator.reduce(t, "sum")``).
        """
        if not self._entries:
            return {}, {}
        tensors = [i for i, (_, _, v) in enumerate(self._entries) if isinstance(v, torch.Tensor)]
        hosts = [i for i, (_, _, v) in enumerate(self._entries) if not isinstance(v, torch.Tensor)]
        device = self._entries[tensors[0]][2].device if tensors else torch.device("cpu")
        # float64 where the device has it (not MPS / XLA): the reduction then adds no rounding.
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        parts = []
        if tensors:
            parts.append(torch.stack([self._entries[i][2].to(device=device, dtype=dtype) for i in tensors]))
        if hosts:  # host numbers (counts known on the host) go over in one copy
            parts.append(torch.tensor([self._entries[i][2] for i in hosts], dtype=dtype, device=device))
        stacked = torch.cat(parts) if len(parts) > 1 else parts[0]  # (n,)
        reduced = reduce_sum(stacked).tolist()  # the one collective and the one host sync
        values = [0.0] * len(self._entries)
        for position, index in enumerate(tensors + hosts):
            values[index] = reduced[position]
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        raw: dict[str, float] = {}
        for (kind, name, _), value in zip(self._entries, values):
            table = num if kind == "num" else den if kind == "den" else raw
            table[name] = table.get(name, 0.0) + value
        metrics = {name: num[name] / den[name] for name in num if den.get(name, 0.0) > 0}
        return metrics, raw
