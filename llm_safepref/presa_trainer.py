"""PRESA on TRL: ``PresaTrainer``, a ``DPOTrainer`` whose loss is PRESA's Lagrangian.

PRESA (Gong, Varakantham, Kumar, AAMAS 2026, arXiv 2512.20173) learns from preference
pairs whose two responses also carry a binary safety label y (+1 safe, -1 unsafe):

    min_pi max_{nu >= 0}  L_pref(chosen, rejected) + nu * (delta - E[sigmoid(y * u(sigma))])

with ``u = safety_beta * (S - S_ref) - z`` the safety utility of a response and ``S`` the
sum of its completion-token log-probs. ``L_pref`` is CPL or DPO. nu moves by projected
dual ascent, once per optimiser step.

Design decisions:

* Everything but the loss is TRL's: dataset preparation (prompt extraction, chat template,
  EOS, tokenisation), the fused-LM-head log-probs (``model(..., fused_lm_head=True)``),
  the reference (separate model, disabled LoRA adapter, or precomputed log-probs via
  ``compute_ref_log_probs``), checkpoints and the model card.
* ``_compute_loss`` is the one overridden hook: ONE policy forward and ONE reference
  forward per batch give ``(2B,)`` sums; the preference loss and the safety probability
  are both computed from those same sums by the pure functions of
  :mod:`llm_safepref.losses`. No loss math lives here.
* Safety labels travel as two extra dataset columns kept through
  ``_set_signature_columns_if_needed``, become bool tensors in :class:`PresaDataCollator`,
  and are popped from the batch before any forward: nothing unknown reaches the model.
* nu is a :class:`~llm_safepref.losses.LagrangeMultiplier`. The mean safety probability is
  accumulated over the micro-batches of one optimiser step, summed over processes
  (``accelerator.reduce``) and used for one update at ``on_step_end``: every rank computes
  the same float, so every rank holds the same nu. nu is written to ``lagrange.json`` by
  every ``save_model`` (so into every checkpoint, before ``trainer_state.json``), and read
  back when training resumes from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from llm_safepref.data_checks import SAFETY_LABEL_COLUMNS, check_presa_dataset, warn_dropped_rows
from llm_safepref.losses import LagrangeMultiplier, cpl_loss, dpo_loss, presa_lagrangian, safety_prob
from llm_safepref.presa_config import PresaConfig

__all__ = ["PresaDataCollator", "PresaTrainer", "LAGRANGE_FILE"]

logger = logging.getLogger(__name__)

#: File holding nu's state in every checkpoint and in the final output folder.
LAGRANGE_FILE = "lagrange.json"
# Batch keys that are never model inputs.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *SAFETY_LABEL_COLUMNS}
_ROW_COLUMN = "__presa_row"


@dataclass
class PresaDataCollator(DataCollatorForPreference):
    """TRL's preference collator plus the two safety labels as ``(B,)`` bool tensors.

    The batch is ``[chosen; rejected]`` (2B rows) as in TRL; ``chosen_is_safe[i]`` and
    ``rejected_is_safe[i]`` belong to rows ``i`` and ``B + i``.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for column in SAFETY_LABEL_COLUMNS:
            if column not in examples[0]:
                raise KeyError(
                    f"batch has no {column!r}: the safety labels were dropped before the collator "
                    f"(keys: {sorted(examples[0])})"
                )
            output[column] = torch.tensor([bool(example[column]) for example in examples], dtype=torch.bool)
        return output


class _LagrangeCallback(TrainerCallback):
    """Moves nu once per optimiser step (after gradient accumulation, before log and save)."""

    def __init__(self, trainer: "PresaTrainer"):
        self._trainer = weakref.ref(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._update_multiplier()


class PresaTrainer(DPOTrainer):
    """Trainer for PRESA: CPL/DPO preferences + a Lagrangian safety-label constraint.

    Takes the arguments of :class:`trl.DPOTrainer` with a :class:`PresaConfig`. The train
    (and eval) dataset needs ``prompt``, ``chosen``, ``rejected`` (plain text or
    conversational) and boolean ``chosen_is_safe`` / ``rejected_is_safe`` columns.
    """

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

    def __init__(self, model, ref_model=None, args: PresaConfig | None = None, data_collator=None, **kwargs):
        if args is None:
            args = PresaConfig("presa-output")
        if not isinstance(args, PresaConfig):
            raise TypeError(f"PresaTrainer needs a PresaConfig, got {type(args).__name__}")
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None:
            # DPOTrainer would load it too; the collator needs its pad token first.
            from transformers import AutoTokenizer
            from trl.trainer.utils import get_config_model_id

            tokenizer = AutoTokenizer.from_pretrained(model if isinstance(model, str) else get_config_model_id(model.config))
            kwargs["processing_class"] = tokenizer
        if data_collator is None and tokenizer is not None and hasattr(tokenizer, "pad_token_id"):
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            data_collator = PresaDataCollator(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        if data_collator is None:
            raise ValueError("PresaTrainer needs `processing_class` (a tokenizer) or a collator that keeps the labels")

        self.multiplier = LagrangeMultiplier(
            delta=args.safety_delta, lr=args.nu_lr, init=args.nu_init, nu_max=args.nu_max
        )
        self._pref_loss = args.pref_loss
        self._ref_point = args.safety_ref_point_value
        # Safety-probability sum and count of the micro-batches of the current optimiser step.
        self._step_p_sum = 0.0
        self._step_p_count = 0
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator, **kwargs)
        self.add_callback(_LagrangeCallback(self))

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Check what the loss needs on the raw rows, then let TRL tokenise; TRL silently drops
        # rows whose prompt fills max_length, so tag rows to report which ones went.
        if not isinstance(dataset, Dataset) or "prompt_ids" in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        check_presa_dataset(dataset, name=dataset_name)
        total = len(dataset)
        dataset = dataset.add_column(_ROW_COLUMN, list(range(total)))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and len(dataset) < total:
            kept = set(dataset[_ROW_COLUMN])
            dropped = [row for row in range(total) if row not in kept]
            warn_dropped_rows(dropped, total, name=dataset_name, max_length=args.max_length)
        return dataset.remove_columns(_ROW_COLUMN)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the labels when `remove_unused_columns` prunes the dataset.
        for column in SAFETY_LABEL_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_ref_log_probs(self, model, inputs):
        # Also used by TRL's precompute pass, whose batches come from our collator.
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in SAFETY_LABEL_COLUMNS})

    # ------------------------------------------------------------------ loss

    def _completion_logps(self, outputs, seq_len: int) -> torch.Tensor:
        # (2B, T) per-token log-probs, 0 outside the completion -> (2B,) sums. Prompt-learning
        # PEFT prepends virtual tokens, so keep the last seq_len positions.
        return outputs.log_probs[:, -seq_len:].sum(dim=1)

    def _reference_logps(self, model_kwargs: dict, labels: torch.Tensor, seq_len: int) -> torch.Tensor:
        """One no-grad forward of the reference: separate model or the policy with its adapter off."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_outputs = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
            elif self.ref_model is not None:
                ref_outputs = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
            else:
                raise RuntimeError("no reference: pass ref_model, use PEFT, or set precompute_ref_log_probs=True")
        return self._completion_logps(ref_outputs, seq_len)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen_is_safe, rejected_is_safe = inputs["chosen_is_safe"], inputs["rejected_is_safe"]  # (B,) bool
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]  # (2B, T)
        seq_len = completion_mask.size(1) - 1
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        # One policy forward and one reference forward over [chosen; rejected].
        logps = self._completion_logps(model(**model_kwargs, labels=labels, fused_lm_head=True), seq_len)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps)
        else:
            ref_logps = self._reference_logps(model_kwargs, labels, seq_len)
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,), (B,)
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)

        # Preference term (per pair, (B,)).
        if self._pref_loss == "dpo":
            pref_losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta)
            reward_scale = self.beta
        else:
            a_chosen, a_rejected = chosen_logps, rejected_logps
            if self.args.cpl_reference:
                a_chosen, a_rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
            pref_losses = cpl_loss(a_chosen, a_rejected, alpha=self.args.cpl_alpha, bias=self.args.cpl_bias)
            reward_scale = self.args.cpl_alpha

        # Safety term on the same sums (per response, (2B,)).
        is_safe = torch.cat([chosen_is_safe, rejected_is_safe]).to(logps.device)
        ref_point = self._safety_ref_point(logps, ref_logps)
        p = safety_prob(logps, ref_logps, is_safe, beta=self.args.safety_beta, ref_point=ref_point)
        weights = self._safety_weights(is_safe, p)
        weight_total = None
        if weights is not None and self.accelerator.num_processes > 1:
            # Normalise by the global weight so that DDP's average of the processes' losses is
            # the weighted mean over the global batch.
            weight_total = self.accelerator.reduce(weights.sum().detach(), reduction="sum") / self.accelerator.num_processes
        loss = presa_lagrangian(pref_losses, p, self.multiplier.value, self.multiplier.delta, weights=weights,
                                weight_total=weight_total)

        if mode == "train" and torch.is_grad_enabled():
            # Weighted sums, so nu sees the same (weighted) mean the loss constrains.
            w = torch.ones_like(p) if weights is None else weights
            p_sum, w_sum = torch.stack([(w * p.detach()).sum(), w.sum()]).tolist()  # one host sync
            self._step_p_sum += p_sum
            self._step_p_count += w_sum
        self._log_batch_metrics(
            mode, pref_losses, p, is_safe, reward_scale, chosen_logps, rejected_logps, ref_chosen_logps,
            ref_rejected_logps, ref_point,
        )
        if return_outputs:
            return loss, {"safety_prob": p.detach(), "pref_losses": pref_losses.detach()}
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
        if self._ref_point != "kto":
            return self._ref_point
        # KTO's z = max(0, E[S - S_ref]), here a detached estimate over this batch on all
        # processes (KTO itself uses mismatched pairs, which would cost another forward).
        with torch.no_grad():
            stats = torch.stack([(logps - ref_logps).sum(), torch.tensor(float(logps.numel()), device=logps.device)])
            stats = self.accelerator.reduce(stats, reduction="sum")
            z = (stats[0] / stats[1]).clamp(min=0.0)
        return self.args.safety_beta * z

    def _log_batch_metrics(
        self, mode, pref_losses, p, is_safe, reward_scale, chosen_logps, rejected_logps, ref_chosen_logps,
        ref_rejected_logps, ref_point,
    ) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        with torch.no_grad():
            p, is_safe = p.detach(), is_safe.bool()
            # Sums and counts gathered over processes, so means are over the global batch.
            sums = torch.stack([(p * is_safe).sum(), is_safe.sum().to(p), (p * ~is_safe).sum(), (~is_safe).sum().to(p)])
            sums = self.accelerator.reduce(sums, reduction="sum")  # not gather_for_metrics: not per-sample
            if sums[1] > 0:
                metrics["safety/prob_safe"].append((sums[0] / sums[1]).item())
            if sums[3] > 0:
                metrics["safety/prob_unsafe"].append((sums[2] / sums[3]).item())
            metrics["safety/prob_mean"].append(gather(p).mean().item())
            metrics["safety/frac_safe"].append((sums[1] / (sums[1] + sums[3])).item())
            metrics["loss/preference"].append(gather(pref_losses.detach()).mean().item())
            if isinstance(ref_point, torch.Tensor):
                metrics["safety/ref_point"].append(ref_point.item())

            chosen_rewards = reward_scale * (chosen_logps.detach() - ref_chosen_logps)
            rejected_rewards = reward_scale * (rejected_logps.detach() - ref_rejected_logps)
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
            if mode == "eval":
                metrics["lagrange/nu"].append(self.multiplier.value)

    # ------------------------------------------------------------------ Lagrange multiplier

    def _update_multiplier(self) -> None:
        """One projected ascent step with the all-process mean safety probability of this step."""
        stats = torch.tensor([self._step_p_sum, float(self._step_p_count)], dtype=torch.float64,
                             device=self.accelerator.device)
        stats = self.accelerator.reduce(stats, reduction="sum")
        self._step_p_sum, self._step_p_count = 0.0, 0
        if stats[1] <= 0:
            return
        mean_p = (stats[0] / stats[1]).item()
        self.multiplier.update(mean_p)
        metrics = self._metrics["train"]
        metrics["lagrange/nu"].append(self.multiplier.value)
        metrics["lagrange/constraint"].append(self.multiplier.constraint(mean_p))
        metrics["lagrange/step_prob_mean"].append(mean_p)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        # nu is the same on every rank; one file written by the process that saves.
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            state = {**self.multiplier.state_dict(), "global_step": self.state.global_step}
            path = os.path.join(output_dir, LAGRANGE_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(state, f, indent=2)
            os.replace(path + ".tmp", path)  # atomic: a kill never leaves half a file

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LAGRANGE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self.multiplier.load_state_dict(json.load(f))
            logger.info("restored nu=%s from %s", self.multiplier.value, path)
        else:
            logger.warning("checkpoint %s has no %s: nu restarts at nu_init=%s", checkpoint, LAGRANGE_FILE,
                           self.multiplier.value)

    @property
    def nu(self) -> float:
        """The current value of the Lagrange multiplier."""
        return self.multiplier.value

    def nu_trajectory(self) -> list[dict[str, float]]:
        """``[{"step", "nu", "constraint"}]`` from the log history (for plots and model cards)."""
        return [
            {"step": e["step"], "nu": e["lagrange/nu"], "constraint": e.get("lagrange/constraint", float("nan"))}
            for e in self.state.log_history
            if "lagrange/nu" in e and "step" in e and "eval_lagrange/nu" not in e
        ]

