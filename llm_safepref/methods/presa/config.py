"""Configuration of :class:`~llm_safepref.methods.presa.trainer.PresaTrainer`.

Design decisions:

* ``PresaConfig`` extends :class:`~llm_safepref.methods.base.LabelledPreferenceConfig` (TRL's
  ``DPOConfig`` with CPU-friendly defaults, DPO's loss options refused, the multiplier's
  ``nu_init`` / ``nu_lr`` / ``nu_max``); only PRESA's own knobs are added here.
* PRESA (Gong, Varakantham, Kumar, AAMAS 2026, arXiv 2512.20173) minimises
  ``L_pref + nu * (delta - E[p(y | sigma)])``; the fields name the pieces of that Lagrangian:
  ``pref_loss`` (+ its ``cpl_*`` / ``beta`` parameters), ``safety_beta`` and
  ``safety_ref_point`` (the safety utility), ``safety_delta`` (delta, the multiplier's
  constraint level), the class weights of the constraint's mean, and ``nu_*`` (inherited).
* Every field and default is the one PRESA had before the per-method layout (recipes and
  their YAML use them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llm_safepref.core.losses import get_preference_loss
from llm_safepref.methods.base.config import LabelledPreferenceConfig, require

__all__ = ["PresaConfig"]


@dataclass
class PresaConfig(LabelledPreferenceConfig):
    r"""Configuration for :class:`~llm_safepref.methods.presa.trainer.PresaTrainer`.

    Every ``DPOConfig`` / ``TrainingArguments`` field is accepted. ``beta`` is DPO's beta,
    used when ``pref_loss="dpo"`` and as the scale of the logged ``rewards/*`` metrics.
    """

    _trainer_name = "PresaTrainer"
    _loss_option = "pref_loss ('cpl' or 'dpo')"

    # ---------------------------------------------------------------- preference term
    pref_loss: str = field(
        default="cpl",
        metadata={
            "help": "Preference loss of llm_safepref.core.losses: 'cpl' (Contrastive Preference Learning, with "
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

    safety_gradient: str = field(
        default="prob",
        metadata={
            "help": "Policy gradient of the safety term (core presa_lagrangian): 'prob' = PRESA as written, the "
            "gradient of -p(y|sigma), which vanishes when the observed label has become near-impossible; "
            "'log_prob' = the gradient of -log p(y|sigma), which does not. The loss value and the multiplier's "
            "update are the same for both.",
            "choices": ["prob", "log_prob"],
        },
    )

    def __post_init__(self):
        super().__post_init__()
        get_preference_loss(self.pref_loss)  # ValueError listing the valid names
        require(self.cpl_alpha > 0, f"cpl_alpha must be > 0, got {self.cpl_alpha}")
        require(0 < self.cpl_bias <= 1, f"cpl_bias (CPL's lambda) must lie in (0, 1], got {self.cpl_bias}")
        require(self.safety_beta > 0, f"safety_beta must be > 0, got {self.safety_beta}")
        require(0.0 <= self.safety_delta <= 1.0, f"safety_delta must lie in [0, 1], got {self.safety_delta}")
        require(self.safety_safe_weight >= 0 and self.safety_unsafe_weight >= 0
                and self.safety_safe_weight + self.safety_unsafe_weight > 0,
                f"safety_safe_weight and safety_unsafe_weight must be >= 0 and not both 0, got "
                f"{self.safety_safe_weight} and {self.safety_unsafe_weight}")
        require(self.safety_gradient in ("prob", "log_prob"),
                f"safety_gradient must be 'prob' or 'log_prob', got {self.safety_gradient!r}")
        self.safety_ref_point_value  # noqa: B018  (parses and validates)

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
        require(math.isfinite(value), f"safety_ref_point must be finite, got {z!r}")
        return value
