"""Configuration shared by every preference-with-labels trainer (:class:`LabelledPreferenceConfig`).

Design decisions:

* It extends TRL's ``DPOConfig``: data preparation, the reference model, precomputed
  reference log-probs and every ``TrainingArguments`` field keep their TRL meaning. A method
  adds only its own knobs (``methods/<name>/config.py``).
* Defaults that hurt on a CPU are changed (TRL turns bf16 and gradient checkpointing on):
  bf16 is on only where a CUDA device supports it, gradient checkpointing is off, and the log
  is written every step (so that a multiplier is seen every step).
* DPO's own loss options (``loss_type``, ``loss_weights``, ``ld_alpha``, f-divergences,
  ``use_weighting``, ``label_smoothing``) are replaced by the method's loss, so setting one is
  an error instead of being silently ignored. Subclasses name themselves and their loss option
  in the message through ``_trainer_name`` / ``_loss_option``.
* The Lagrange multiplier's fields (``nu_init``, ``nu_lr``, ``nu_max``) live here, not in a
  mixin: the multiplier is machinery of the base trainer (built, updated, checkpointed there),
  PRESA always uses it and Safe-CPL uses the same one when it adds PRESA's safety term, so one
  definition, one validation and one help text serve both. A trainer that builds no
  multiplier warns when they are set to anything but their defaults. The constraint's level
  (``safety_delta`` for PRESA) belongs to the method that defines the constraint.
* Every field has help text (``--help`` of the recipes shows it); cross-field checks run in
  ``__post_init__`` and raise ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

__all__ = ["LabelledPreferenceConfig", "require"]

#: TRL's default ``loss_type`` (after DPOConfig turns a string into a list).
_DPO_DEFAULT_LOSS = ["sigmoid"]


@dataclass
class LabelledPreferenceConfig(DPOConfig):
    r"""Configuration of :class:`~llm_safepref.methods.base.LabelledPreferenceTrainer`.

    Every ``DPOConfig`` / ``TrainingArguments`` field is accepted. ``beta`` keeps DPO's meaning
    where the method uses a DPO term, and scales the logged ``rewards/*`` otherwise unless the
    method says so.
    """

    # Named in error messages; a method's config sets both (plain class attributes, not fields).
    _trainer_name = "this trainer"
    _loss_option = "the method's own loss options"

    # ---------------------------------------------------------------- CPU-friendly defaults
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Use bf16 mixed precision. Unset: on only when a CUDA device with bf16 support is used "
            "(bf16 autocast is about 2x slower on CPUs, unlike TRL's default)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Enable gradient checkpointing (off by default: slower, and not needed for small models)."},
    )
    logging_steps: float = field(
        default=1,
        metadata={"help": "Log every X optimiser steps (default 1, so that lagrange/nu is logged every step)."},
    )

    reference_logps_cache: bool = field(
        default=False,
        metadata={
            "help": "Memoise the reference's per-batch log-prob sums on disk (llm_safepref.methods.base."
            "reference_cache): a batch seen before (same tensors, same frozen base model, threads and libraries) "
            "skips the reference forward, bit-identically. Used only where exact (a PEFT policy whose reference "
            "is the base model, no dropout, inputs not conditioned); hits and misses go to run_metrics.json."
        },
    )

    # ---------------------------------------------------------------- Lagrange multiplier
    nu_init: float = field(
        default=1.0,
        metadata={"help": "Initial value of the Lagrange multiplier nu (>= 0, <= nu_max)."},
    )
    nu_lr: float = field(
        default=0.5,
        metadata={
            "help": "Step size of nu's projected ascent, once per optimiser step: nu <- clip(nu + nu_lr * violation, "
            "0, nu_max), the violation taken at the step's mean over all processes and micro-batches (PRESA: "
            "delta - mean p). Unused by a method without a constraint."
        },
    )
    nu_max: float = field(
        default=10.0,
        metadata={"help": "Upper bound of nu (projection interval [0, nu_max])."},
    )

    def __post_init__(self):
        # bf16 only where it helps; must be decided before TrainingArguments validates it.
        if self.bf16 is None:
            self.bf16 = (
                not self.fp16
                and not self.use_cpu
                and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported()
            )
        super().__post_init__()

        require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        require(self.nu_max >= 0, f"nu_max must be >= 0, got {self.nu_max}")
        require(0.0 <= self.nu_init <= self.nu_max,
                f"nu_init must lie in [0, nu_max={self.nu_max}], got {self.nu_init}")
        require(self.nu_lr >= 0, f"nu_lr must be >= 0, got {self.nu_lr}")

        # DPO's loss options have no meaning under the method's loss: refuse rather than ignore them.
        name, option = self._trainer_name, self._loss_option
        require(
            list(self.loss_type) == _DPO_DEFAULT_LOSS,
            f"loss_type={self.loss_type} is a DPOTrainer option; {name} uses {option} instead",
        )
        require(self.loss_weights is None, f"loss_weights is a DPOTrainer option; {name} uses {option} instead")
        require(self.ld_alpha is None, f"ld_alpha (LD-DPO) is not supported by {name}")
        require(self.f_divergence_type == "reverse_kl",
                f"f_divergence_type other than 'reverse_kl' is not supported by {name}, got {self.f_divergence_type!r}")
        require(not self.use_weighting, f"use_weighting (WPO) is not supported by {name}")
        require(self.label_smoothing == 0.0,
                f"label_smoothing (robust / EXO DPO) is not supported by {name}, got {self.label_smoothing}")


def require(ok: bool, message: str) -> None:
    """``ValueError(message)`` unless ``ok`` (the configs' one way to refuse a value)."""
    if not ok:
        raise ValueError(message)
