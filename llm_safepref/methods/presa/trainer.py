"""PRESA on TRL: ``PresaTrainer``, a labelled-preference trainer whose loss is PRESA's Lagrangian.

PRESA (Gong, Varakantham, Kumar, AAMAS 2026, arXiv 2512.20173) learns from preference
pairs whose two responses also carry a binary safety label y (+1 safe, -1 unsafe):

    min_pi max_{nu >= 0}  L_pref(chosen, rejected) + nu * (delta - E[sigmoid(y * u(sigma))])

with ``u = safety_beta * (S - S_ref) - z`` the safety utility of a response and ``S`` the
sum of its completion-token log-probs. ``L_pref`` is CPL or DPO. nu moves by projected
dual ascent, once per optimiser step.

Design decisions:

* Everything but the loss is the base's (:mod:`llm_safepref.methods.base`) or TRL's: label
  columns ``chosen_is_safe`` / ``rejected_is_safe`` kept, collated and popped; one policy and
  one reference forward giving ``(2B,)`` sums; the multiplier, its update and checkpoints;
  batched metrics.
* :meth:`PresaTrainer.compute_pair_loss` is the method: the preference loss, the safety
  probability and the Lagrangian are the pure functions of :mod:`llm_safepref.core.losses`
  on the base's sums. What is left here is per-batch bookkeeping: the constraint's class
  weights and the KTO reference point's all-process batch estimate.
* The constrained quantity handed to the multiplier is the same (weighted) mean the loss
  constrains, so nu moves with what the policy gradient sees.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import torch

from llm_safepref.core.losses import cpl_loss, dpo_loss, presa_lagrangian, safety_prob
from llm_safepref.core.schema import Metric
from llm_safepref.data_checks import SAFETY_LABEL_COLUMNS, check_presa_dataset
from llm_safepref.methods.base.metrics import BatchSums
from llm_safepref.methods.base.trainer import (
    LAGRANGE_FILE,
    LabelledPreferenceCollator,
    LabelledPreferenceTrainer,
    PairForward,
)
from llm_safepref.methods.presa.config import PresaConfig

__all__ = ["LAGRANGE_FILE", "PresaDataCollator", "PresaTrainer"]


@dataclass
class PresaDataCollator(LabelledPreferenceCollator):
    """TRL's preference collator plus the two safety labels as ``(B,)`` bool tensors.

    The batch is ``[chosen; rejected]`` (2B rows) as in TRL; ``chosen_is_safe[i]`` and
    ``rejected_is_safe[i]`` belong to rows ``i`` and ``B + i``.
    """

    label_columns: tuple[str, ...] = SAFETY_LABEL_COLUMNS

    def collate_label(self, column: str, values: list[Any]) -> torch.Tensor:
        return torch.tensor([bool(v) for v in values], dtype=torch.bool)


class PresaTrainer(LabelledPreferenceTrainer):
    """Trainer for PRESA: CPL/DPO preferences + a Lagrangian safety-label constraint.

    Takes the arguments of :class:`trl.DPOTrainer` with a :class:`PresaConfig`. The train
    (and eval) dataset needs ``prompt``, ``chosen``, ``rejected`` (plain text or
    conversational) and boolean ``chosen_is_safe`` / ``rejected_is_safe`` columns.
    """

    label_columns = SAFETY_LABEL_COLUMNS
    config_class = PresaConfig
    collator_class = PresaDataCollator
    default_output_dir = "presa-output"
    _tag_names = ["trl", "presa", "llm_safepref"]
    _name = "PRESA"
    # Only what methods.md records about the paper (no invented fields).
    _paper = {
        "title": "PRESA: Preference and Safety Alignment",
        "id": "2512.20173",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @misc{gong2026presa,
                title         = {{PRESA: Preference and Safety Alignment}},
                author        = {Gong and Varakantham and Kumar},
                note          = {AAMAS 2026},
                year          = 2026,
                eprint        = {2512.20173},
                archivePrefix = {arXiv},
            }"""),
    }

    def check_dataset(self, dataset, name: str) -> None:
        check_presa_dataset(dataset, name=name)

    def constraint_threshold(self, args: PresaConfig) -> float:
        return args.safety_delta

    @property
    def reward_scale(self) -> float:
        return self.beta if self.args.pref_loss == "dpo" else self.args.cpl_alpha

    def compute_pair_loss(self, pair: PairForward, sums: BatchSums) -> torch.Tensor:
        args = self.args
        chosen_logps, rejected_logps = pair.chosen_logps, pair.rejected_logps  # (B,)
        ref_chosen_logps, ref_rejected_logps = pair.ref_chosen_logps, pair.ref_rejected_logps

        # Preference term, per pair (B,).
        if args.pref_loss == "dpo":
            pref_losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta)
        elif args.cpl_reference:
            pref_losses = cpl_loss(chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps,
                                   alpha=args.cpl_alpha, bias=args.cpl_bias)
        else:
            pref_losses = cpl_loss(chosen_logps, rejected_logps, alpha=args.cpl_alpha, bias=args.cpl_bias)

        # Safety term on the same sums, per response over [chosen; rejected] (2B,).
        is_safe = torch.cat([pair.labels["chosen_is_safe"], pair.labels["rejected_is_safe"]]).to(pair.logps.device)
        ref_point = self._safety_ref_point(pair.logps, pair.ref_logps)
        p = safety_prob(pair.logps, pair.ref_logps, is_safe, beta=args.safety_beta, ref_point=ref_point)
        weights = self._safety_weights(is_safe, p)
        multiplier = self.multiplier
        loss = presa_lagrangian(pref_losses, p, multiplier.value, multiplier.delta, weights=weights,
                                weight_total=self.global_weight_total(weights),
                                safety_gradient=args.safety_gradient)

        # nu sees the same (weighted) mean the loss constrains.
        self.record_constraint(sums, p, weights)
        safe = is_safe.bool()
        sums.ratio(Metric.PROB_SAFE, (p * safe).sum(), safe.sum())
        sums.ratio(Metric.PROB_UNSAFE, (p * ~safe).sum(), (~safe).sum())
        sums.mean(Metric.PROB_MEAN, p)
        sums.mean(Metric.FRAC_SAFE, safe)
        sums.mean(Metric.PREFERENCE_LOSS, pref_losses)
        if isinstance(ref_point, torch.Tensor):
            sums.ratio(Metric.REF_POINT, ref_point, 1.0)  # the same z on every process
        pair.extras.update(safety_prob=p.detach(), pref_losses=pref_losses.detach())
        return loss

    def _safety_weights(self, is_safe: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        """Per-response weights of the safety constraint over ``[chosen; rejected]`` (None: all 1).

        Class weights per label; with ``safety_exclude_safe_rejected`` a safe rejected response
        weighs 0 (the preference term lowers it; the safety term must not raise it).
        """
        w_safe, w_unsafe = self.args.safety_safe_weight, self.args.safety_unsafe_weight
        exclude = self.args.safety_exclude_safe_rejected
        if w_safe == 1.0 and w_unsafe == 1.0 and not exclude:
            return None
        is_safe = is_safe.bool()
        w = torch.where(is_safe, w_safe, w_unsafe).to(p)
        if exclude:
            rejected = torch.arange(is_safe.numel(), device=is_safe.device) >= is_safe.numel() // 2
            w = w.masked_fill(rejected & is_safe, 0.0)
        return w

    def _safety_ref_point(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> float | torch.Tensor:
        """KTO's z in utility units: the configured number, or for ``"kto"`` the detached estimate
        ``safety_beta * max(0, mean(S - S_ref))`` over this batch on all processes (KTO itself uses
        mismatched pairs, which would cost another forward)."""
        z = self.args.safety_ref_point_value
        if z != "kto":
            return z
        with torch.no_grad():
            stats = torch.stack([(logps - ref_logps).sum(), torch.tensor(float(logps.numel()), device=logps.device)])
            stats = self.accelerator.reduce(stats, reduction="sum")
            z = (stats[0] / stats[1]).clamp(min=0.0)
        return self.args.safety_beta * z
