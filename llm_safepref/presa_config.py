"""Configuration of :class:`~llm_safepref.presa_trainer.PresaTrainer`.

Design decisions:

* ``PresaConfig`` extends TRL's ``DPOConfig``: data preparation, reference handling and
  every ``TrainingArguments`` field keep their TRL meaning; only PRESA's own knobs are added.
* PRESA (Gong, Varakantham, Kumar, AAMAS 2026, arXiv 2512.20173) minimises
  ``L_pref + nu * (delta - E[p(y | sigma)])``; the fields below name the pieces of that
  Lagrangian: ``pref_loss`` (+ its ``cpl_*`` / ``beta`` parameters), ``safety_beta`` and
  ``safety_ref_point`` (the safety utility), ``safety_delta`` (delta) and ``nu_*`` (the dual
  variable's projected ascent).
* DPO's own loss options (``loss_type``, ``ld_alpha``, f-divergences, WPO weighting) are
  replaced by PRESA's loss, so setting them is an error instead of being silently ignored.
* Defaults that hurt on a CPU (TRL turns bf16 and gradient checkpointing on) are changed:
  bf16 is on only where a CUDA device supports it, gradient checkpointing is off, and the
  log is written every step so that ``lagrange/nu`` is seen every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from llm_safepref.losses import get_preference_loss

__all__ = ["PresaConfig"]

_DPO_DEFAULT_LOSS = ["sigmoid"]


@dataclass
class PresaConfig(DPOConfig):
    r"""Configuration for :class:`~llm_safepref.presa_trainer.PresaTrainer`.

    Every ``DPOConfig`` / ``TrainingArguments`` field is accepted. ``beta`` is DPO's beta,
    used when ``pref_loss="dpo"`` and as the scale of the logged ``rewards/*`` metrics.
    """

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

    # ---------------------------------------------------------------- preference term
    pref_loss: str = field(
        default="cpl",
        metadata={
            "help": "Preference loss of llm_safepref.losses: 'cpl' (Contrastive Preference Learning, with "
            "cpl_alpha / cpl_bias) or 'dpo' (DPO's sigmoid loss with beta)."
        },
    )
    cpl_alpha: float = field(
        default=0.1,
        metadata={"help": "CPL temperature alpha: score A = alpha * (S - S_ref) (or alpha * S without reference)."},
    )
    cpl_bias: float = field(
        default=1.0,
        metadata={
            "help": "CPL conservative bias lambda in (0, 1]: loss = -log sigmoid(A(chosen) - lambda * A(rejected)). "
            "With lambda = 1, alpha = beta and cpl_reference=True, CPL is exactly DPO."
        },
    )
    cpl_reference: bool = field(
        default=True,
        metadata={
            "help": "Use reference-adjusted sums S - S_ref in the CPL score (the CPL-KL variant). The reference "
            "forward is run anyway for the safety term, so this costs nothing."
        },
    )

    # ---------------------------------------------------------------- safety term
    safety_beta: float = field(
        default=0.1,
        metadata={"help": "Scale of the safety utility u = safety_beta * (S - S_ref) - z; p(y|sigma) = sigmoid(y u)."},
    )
    safety_ref_point: str | None = field(
        default=None,
        metadata={
            "help": "KTO-style reference point z of the safety utility: unset or a number (in utility units, "
            "0 = KTO's apo_zero_unpaired), or 'kto' for a detached batch estimate "
            "safety_beta * max(0, mean(S - S_ref)) averaged over all processes."
        },
    )
    safety_delta: float = field(
        default=0.7,
        metadata={
            "help": "Constraint level delta in [0, 1]: training asks E[p(y|sigma)] >= delta, the mean probability "
            "the policy gives to the observed safety labels (0.5 at the start, where policy = reference)."
        },
    )

    safety_safe_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of safe responses in the safety constraint's mean, E_w[p] = sum(w p) / sum(w) (KTO's "
            "desirable_weight). With safe responses pushed up less, the term works mostly by pushing unsafe "
            "responses down, which raises refusals on benign prompts less. KTO's rule of thumb: "
            "safe_weight * n_safe ~ unsafe_weight * n_unsafe."
        },
    )
    safety_unsafe_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of unsafe responses in the safety constraint's mean (KTO's undesirable_weight)."},
    )

    safety_exclude_safe_rejected: bool = field(
        default=False,
        metadata={
            "help": "Leave safe *rejected* responses out of the safety term (weight 0), so that it never pushes up "
            "a response the preference term pushes down. In safety data these are mostly refusals that lose "
            "to a helpful answer (over-refusals); raising them teaches the policy to refuse harmless prompts."
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
            "help": "Step size of nu's projected ascent, once per optimiser step: "
            "nu <- clip(nu + nu_lr * (delta - mean p), 0, nu_max), mean p over all processes and micro-batches."
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

        get_preference_loss(self.pref_loss)  # ValueError listing the valid names
        _require(self.cpl_alpha > 0, f"cpl_alpha must be > 0, got {self.cpl_alpha}")
        _require(0 < self.cpl_bias <= 1, f"cpl_bias (CPL's lambda) must lie in (0, 1], got {self.cpl_bias}")
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(self.safety_beta > 0, f"safety_beta must be > 0, got {self.safety_beta}")
        _require(0.0 <= self.safety_delta <= 1.0, f"safety_delta must lie in [0, 1], got {self.safety_delta}")
        _require(self.safety_safe_weight >= 0 and self.safety_unsafe_weight >= 0
                 and self.safety_safe_weight + self.safety_unsafe_weight > 0,
                 f"safety_safe_weight and safety_unsafe_weight must be >= 0 and not both 0, got "
                 f"{self.safety_safe_weight} and {self.safety_unsafe_weight}")
        _require(self.nu_max >= 0, f"nu_max must be >= 0, got {self.nu_max}")
        _require(0.0 <= self.nu_init <= self.nu_max, f"nu_init must lie in [0, nu_max={self.nu_max}], got {self.nu_init}")
        _require(self.nu_lr >= 0, f"nu_lr must be >= 0, got {self.nu_lr}")
        self.safety_ref_point_value  # noqa: B018  (parses and validates)

        # DPO's loss options have no meaning under PRESA's loss: refuse rather than ignore them.
        _require(
            list(self.loss_type) == _DPO_DEFAULT_LOSS,
            f"loss_type={self.loss_type} is a DPOTrainer option; PresaTrainer uses pref_loss ('cpl' or 'dpo') instead",
        )
        _require(self.ld_alpha is None, "ld_alpha (LD-DPO) is not supported by PresaTrainer")
        _require(self.f_divergence_type == "reverse_kl", "f_divergence_type other than 'reverse_kl' is not supported")
        _require(not self.use_weighting, "use_weighting (WPO) is not supported by PresaTrainer")

    @property
    def safety_ref_point_value(self) -> float | str:
        """``safety_ref_point`` parsed: a finite float (``0.0`` when unset) or ``"kto"``."""
        z = self.safety_ref_point
        if z is None or (isinstance(z, str) and z.strip().lower() in ("", "none", "null")):
            return 0.0
        if isinstance(z, str) and z.strip().lower() == "kto":
            return "kto"
        try:
            value = float(z)
        except (TypeError, ValueError):
            raise ValueError(f"safety_ref_point must be a number or 'kto', got {z!r}") from None
        _require(math.isfinite(value), f"safety_ref_point must be finite, got {z!r}")
        return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
