"""What every preference-with-labels trainer shares: :class:`LabelledPreferenceTrainer`.

A *preference-with-labels* method learns from TRL preference pairs (``prompt``, ``chosen``,
``rejected``) that carry extra per-pair columns: PRESA's safety labels
(``chosen_is_safe`` / ``rejected_is_safe``), Safe-CPL's annotator (``user_id``) and context
tensors. A method is a subclass that names its columns and writes its loss on the sums
this base computes; everything else is here or TRL's.

Design decisions:

* Everything but the loss is TRL's ``DPOTrainer``: dataset preparation (prompt extraction,
  chat template, EOS, tokenisation), the fused LM head (``model(..., fused_lm_head=True)``,
  per-token log-probs without ``(B, T, V)`` logits), the reference (separate model, disabled
  LoRA adapter, or log-probs precomputed by ``compute_ref_log_probs``), checkpoints, model card.
* Label columns (class attribute ``label_columns``) are kept through TRL's column pruning
  (``_set_signature_columns_if_needed``), collated as tensors by
  :class:`LabelledPreferenceCollator` (a ``DataCollatorForPreference``) and popped from the
  batch before any forward: nothing unknown reaches a model.
* ``_compute_loss`` runs ONE policy forward and ONE reference forward over ``[chosen; rejected]``
  and hands ``(2B,)`` completion log-prob sums (:class:`PairForward`) to the subclass's
  :meth:`compute_pair_loss`. It keeps what TRL's own forward does: the mixture-of-experts
  load-balancing loss (``router_aux_loss_coef * aux_loss`` when the model config has
  ``output_router_logits``, metric ``aux_loss``), the ``entropy`` / ``logits/*`` /
  ``mean_token_accuracy`` / ``num_tokens`` metrics, the adapter-off reference of PEFT models,
  the last-``T-1``-positions rule of prompt-learning PEFT.
* :meth:`condition_model_inputs` is the one hook on the model inputs (default: unchanged).
  A method that conditions the policy (Safe-CPL's soft prompt) replaces ``input_ids`` by
  ``inputs_embeds`` with its embeddings prepended, and ``-100`` labels for them; the base
  keeps only the last ``T-1`` per-token log-probs, so prepended positions never count.
* The optional Lagrange multiplier lives in a :class:`~llm_safepref.methods.base.callback.LagrangeCallback`
  (``TrainerCallback`` + ``ExportableState``, no reference to the trainer). A method turns it
  on by returning its constraint level from :meth:`constraint_threshold` and reporting the
  constrained quantity per micro-batch with :meth:`record_constraint`. nu moves once per
  optimiser step from the all-process mean. It is checkpointed by transformers' own callback
  state (``trainer_state.json``), restored on resume whatever
  ``restore_callback_states_from_checkpoint`` says (the current config's ``nu_lr`` / ``nu_max``
  / delta are kept; only nu and its step count come from the checkpoint), and also written to
  ``lagrange.json`` in every output folder and checkpoint (read by recipes, docs and older
  code; and the fallback when resuming a checkpoint that predates the callback state).
* Metrics: every micro-batch records sums and counts in a :class:`~llm_safepref.methods.base.metrics.BatchSums`
  reduced by ONE ``accelerator.reduce`` with ONE host sync; the multiplier's sums ride on it.
  Names are :class:`llm_safepref.core.schema.Metric`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from llm_safepref.core.provenance import write_json
from llm_safepref.core.schema import Metric
from llm_safepref.data_checks import is_label, warn_dropped_rows
from llm_safepref.methods.base.callback import LagrangeCallback
from llm_safepref.methods.base.config import LabelledPreferenceConfig
from llm_safepref.methods.base.metrics import CONSTRAINT_SUM, CONSTRAINT_WEIGHT, NUM_TOKENS, BatchSums

__all__ = ["LAGRANGE_FILE", "LabelledPreferenceCollator", "LabelledPreferenceTrainer", "PairForward"]

logger = logging.getLogger(__name__)

#: File holding nu's state in every checkpoint and in the final output folder.
LAGRANGE_FILE = "lagrange.json"
# Batch keys of TRL's collator that are never model inputs.
_TRL_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
# Temporary column that tells which raw rows survived TRL's length filter.
_ROW_COLUMN = "__llm_safepref_row"
_MULTIPLIER_FIELDS = ("nu_init", "nu_lr", "nu_max")


@dataclass
class LabelledPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus the label columns as tensors.

    The batch is ``[chosen; rejected]`` (2B rows) as in TRL; a label column is one value per
    *pair*, a ``(B, ...)`` tensor whose row ``i`` belongs to rows ``i`` and ``B + i``.
    Booleans become ``torch.bool``, numbers and equal-length lists a ``torch.tensor`` of them
    (int64 / float32); override :meth:`collate_label` for anything else.
    """

    label_columns: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for column in self.label_columns:
            missing = [i for i, example in enumerate(examples) if column not in example]
            if missing:
                raise KeyError(
                    f"batch has no {column!r} in examples {missing[:5]} of {len(examples)}: the label column was "
                    f"dropped before the collator (keys: {sorted(examples[missing[0]])})"
                )
            output[column] = self.collate_label(column, [example[column] for example in examples])
        return output

    def collate_label(self, column: str, values: list[Any]) -> torch.Tensor:
        """One label column of the batch as a ``(B, ...)`` tensor."""
        if all(is_label(v) for v in values):
            return torch.tensor([bool(v) for v in values], dtype=torch.bool)
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)
        try:
            return torch.tensor(values)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"label column {column!r}: cannot make one tensor of {values[:3]!r}...: {err}. Give the column "
                "numbers, booleans or equal-length lists, or override collate_label"
            ) from err


@dataclass
class PairForward:
    """The sums one policy and one reference forward give for a batch of B pairs.

    ``logps`` / ``ref_logps``: ``(2B,)`` completion log-prob sums over ``[chosen; rejected]``
    (policy with gradients, reference without). ``labels``: the label columns, ``(B, ...)``
    each. ``outputs``: the policy's ``FusedCausalLMOutput``. ``completion_mask``: ``(2B, T-1)``,
    aligned with the per-token outputs' last ``T-1`` positions. ``extras``: what the method's
    loss wants returned by ``compute_loss(..., return_outputs=True)``.
    """

    logps: torch.Tensor
    ref_logps: torch.Tensor
    labels: dict[str, torch.Tensor]
    outputs: Any
    completion_mask: torch.Tensor
    mode: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.logps.chunk(2)[0]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps.chunk(2)[1]

    @property
    def ref_chosen_logps(self) -> torch.Tensor:
        return self.ref_logps.chunk(2)[0]

    @property
    def ref_rejected_logps(self) -> torch.Tensor:
        return self.ref_logps.chunk(2)[1]


class LabelledPreferenceTrainer(DPOTrainer):
    """Base of the preference-with-labels trainers; subclass it, do not use it directly.

    A method sets ``label_columns``, ``config_class`` (a :class:`LabelledPreferenceConfig`),
    optionally ``collator_class``, and implements :meth:`compute_pair_loss`. Optional hooks:
    :meth:`check_dataset` (raw rows, before tokenisation), :meth:`condition_model_inputs`
    (the forward's inputs), :meth:`constraint_threshold` (turns the multiplier on),
    :attr:`reward_scale` (the scale of ``rewards/*``).
    """

    #: Extra per-pair dataset columns the loss needs (kept, collated, popped before forwards).
    label_columns: tuple[str, ...] = ()
    config_class: type[LabelledPreferenceConfig] = LabelledPreferenceConfig
    collator_class: type[LabelledPreferenceCollator] = LabelledPreferenceCollator
    #: ``output_dir`` when no config is given.
    default_output_dir = "labelled-preference-output"
    #: The multiplier's constraint: ``"ge"`` (mean >= threshold) or ``"le"`` (a budget).
    constraint_sense = "ge"
    #: Whether :meth:`condition_model_inputs` changes the *reference* forward's inputs. A method that
    #: overrides the hook but hands the reference the batch as it is (Safe-CPL: no soft prompt for the
    #: reference) sets ``False``, and its reference sums can then be memoised (``reference_logps_cache``).
    conditions_reference_inputs = True
    _tag_names = ["trl", "llm_safepref"]
    _name = "Labelled preference"

    def __init__(self, model, ref_model=None, args: LabelledPreferenceConfig | None = None, data_collator=None,
                 **kwargs):
        if type(self).compute_pair_loss is LabelledPreferenceTrainer.compute_pair_loss:
            raise TypeError(f"{type(self).__name__} must implement compute_pair_loss (subclass the base per method)")
        if args is None:
            args = self.config_class(self.default_output_dir)
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}")
        if data_collator is None:
            data_collator = self._default_collator(model, args, kwargs)
        callback = self._make_lagrange_callback(args)
        self._lagrange_restored = False  # set when a resume restored nu from the callback state
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator, **kwargs)
        if callback is not None:
            self.add_callback(callback)

    def _default_collator(self, model, args, kwargs: dict) -> LabelledPreferenceCollator:
        processing_class = kwargs.get("processing_class")
        if processing_class is None:
            # DPOTrainer would load it too; the collator needs its pad token first.
            from transformers import AutoTokenizer
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = kwargs["processing_class"] = AutoTokenizer.from_pretrained(name)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds one
        if not hasattr(tokenizer, "pad_token_id"):
            raise ValueError(
                f"{type(self).__name__} needs `processing_class` (a tokenizer) or a `data_collator` that keeps the "
                f"label columns {list(self.label_columns)}"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = args.pad_token or tokenizer.eos_token
        return self.collator_class(
            pad_token_id=tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
            label_columns=tuple(self.label_columns),
        )

    # ------------------------------------------------------------------ method hooks

    def compute_pair_loss(self, pair: PairForward, sums: BatchSums) -> torch.Tensor:
        """The method's scalar loss from ``pair``'s sums; record its metrics in ``sums``.

        Called once per micro-batch, train and eval (``pair.mode``). No forward here: the
        sums are all there is. Call :meth:`record_constraint` when the method has a multiplier.
        """
        raise NotImplementedError

    def check_dataset(self, dataset: Dataset, name: str) -> None:
        """Check the raw (untokenised) rows; default: every label column is there."""
        columns = list(dataset.column_names or [])
        missing = [c for c in self.label_columns if c not in columns]
        if missing:
            raise ValueError(
                f"{name} dataset: missing label column(s) {missing}; {type(self).__name__} needs "
                f"{['prompt', 'chosen', 'rejected', *self.label_columns]}. Found columns: {columns}"
            )

    def condition_model_inputs(self, model, model_kwargs: dict[str, Any], labels: dict[str, torch.Tensor], *,
                               reference: bool) -> dict[str, Any]:
        """The keyword arguments of one forward of ``model`` (default: unchanged).

        ``model`` is the module about to be called (the policy, possibly DDP-wrapped, or the
        reference: a separate model or the policy with its adapter off). ``model_kwargs``
        holds ``input_ids`` / ``attention_mask`` ``(2B, T)``, ``labels`` ``(2B, T)`` (``-100``
        outside the completion) and ``use_cache``; ``labels`` the batch's label columns.
        To condition on embeddings, replace ``input_ids`` by ``inputs_embeds`` ``(2B, P+T, H)``
        and extend ``attention_mask`` and ``labels`` (with ``-100``) by the ``P`` prepended
        positions: only the last ``T-1`` per-token log-probs are summed, so they never count.
        """
        return model_kwargs

    def constraint_threshold(self, args: LabelledPreferenceConfig) -> float | None:
        """The level of the method's constraint, or None for no Lagrange multiplier (default)."""
        return None

    @property
    def reward_scale(self) -> float:
        """Scale of the logged ``rewards/*`` (``scale * (S - S_ref)``); DPO's beta by default."""
        return self.beta

    # ------------------------------------------------------------------ helpers for methods

    def record_constraint(self, sums: BatchSums, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Report the constrained quantity of this micro-batch: nu moves with its weighted mean
        ``sum(w x) / sum(w)`` over the step's micro-batches and processes (``weights`` None: all 1)."""
        values = values.detach()
        w = torch.ones_like(values) if weights is None else weights.detach().to(values)
        sums.raw(CONSTRAINT_SUM, (w * values).sum())
        sums.raw(CONSTRAINT_WEIGHT, w.sum())

    def global_weight_total(self, weights: torch.Tensor | None) -> torch.Tensor | None:
        """All-process ``sum(weights)`` / number of processes (None on one process or without weights).

        With it as ``weight_total`` of :func:`~llm_safepref.core.weighted_mean`, DDP's average of
        the processes' losses is the weighted mean over the global batch.
        """
        if weights is None or self.accelerator.num_processes == 1:
            return None
        total = self.accelerator.reduce(weights.sum().detach(), reduction="sum")
        return total / self.accelerator.num_processes

    # ------------------------------------------------------------------ Lagrange multiplier

    def _make_lagrange_callback(self, args: LabelledPreferenceConfig) -> LagrangeCallback | None:
        delta = self.constraint_threshold(args)
        if delta is None:
            defaults = {f.name: f.default for f in dataclasses.fields(LabelledPreferenceConfig)
                        if f.name in _MULTIPLIER_FIELDS}
            changed = [name for name, default in defaults.items() if getattr(args, name) != default]
            if changed:
                warnings.warn(f"{type(self).__name__} has no constraint, so {changed} are unused", UserWarning,
                              stacklevel=3)
            return None
        return LagrangeCallback(delta=delta, lr=args.nu_lr, init=args.nu_init, nu_max=args.nu_max,
                                sense=self.constraint_sense)

    @property
    def lagrange_callback(self) -> LagrangeCallback | None:
        """The trainer's multiplier callback (looked up each time: a resume may replace it)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LagrangeCallback):
                return callback
        return None

    @property
    def multiplier(self):
        """The :class:`~llm_safepref.core.LagrangeMultiplier`, or None for a method without one."""
        callback = self.lagrange_callback
        return None if callback is None else callback.multiplier

    @property
    def nu(self) -> float | None:
        """The current value of the Lagrange multiplier (None without one)."""
        multiplier = self.multiplier
        return None if multiplier is None else multiplier.value

    def nu_trajectory(self) -> list[dict[str, float]]:
        """``[{"step", "nu", "constraint"}]`` from the log history (for plots and model cards)."""
        return [
            {"step": e["step"], "nu": e[Metric.NU], "constraint": e.get(Metric.CONSTRAINT, float("nan"))}
            for e in self.state.log_history
            if Metric.NU in e and "step" in e and f"eval_{Metric.NU}" not in e
        ]

    def _load_callback_state(self) -> None:
        # transformers restores callback states only with restore_callback_states_from_checkpoint, and
        # then rebuilds each callback from its saved args. nu is training state, not an option: restore
        # it always, into the callback built from the current config.
        ours = self.lagrange_callback
        super()._load_callback_state()
        if ours is None:
            return
        name = type(ours).__name__
        stored = self.state.stateful_callbacks.get(name)
        if isinstance(stored, list):  # several callbacks of one class: transformers pairs them in order
            stored = stored[0] if stored else None
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, LagrangeCallback) and callback is not ours:
                self.callback_handler.callbacks.remove(callback)
        if ours not in self.callback_handler.callbacks:
            self.callback_handler.add_callback(ours)
        if stored is None:
            # A checkpoint from before the callback state: _load_optimizer_and_scheduler reads lagrange.json.
            # Register the state now so that the next checkpoint holds it.
            self.state.stateful_callbacks[name] = ours.state()
            return
        ours.load_state(stored)
        self._lagrange_restored = True
        logger.info("restored nu=%s (%d updates) from the checkpoint's trainer state", ours.multiplier.value,
                    ours.multiplier.num_updates)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        restored, self._lagrange_restored = self._lagrange_restored, False
        multiplier = self.multiplier
        if checkpoint is None or multiplier is None or restored:
            return
        path = os.path.join(checkpoint, LAGRANGE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                multiplier.load_state_dict(json.load(f))
            logger.info("restored nu=%s from %s (the checkpoint has no callback state)", multiplier.value, path)
        else:
            logger.warning("checkpoint %s has neither callback state nor %s: nu restarts at nu_init=%s", checkpoint,
                           LAGRANGE_FILE, multiplier.value)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        # nu is the same on every rank; one file written by the process that saves, atomically
        # (a kill never leaves half a file), before trainer_state.json.
        multiplier = self.multiplier
        if multiplier is not None and self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            write_json(os.path.join(output_dir, LAGRANGE_FILE),
                       {**multiplier.state_dict(), "global_step": self.state.global_step})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        callback = self.lagrange_callback
        if callback is not None and self.model.training:
            for name, values in callback.pop_metrics().items():
                self._metrics["train"][name].extend(values)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Check what the loss needs on the raw rows, then let TRL tokenise; TRL silently drops
        # rows whose prompt fills max_length, so tag rows to report which ones went.
        if not isinstance(dataset, Dataset) or "prompt_ids" in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        self.check_dataset(dataset, dataset_name)
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
        # Keep the label columns when `remove_unused_columns` prunes the dataset.
        for column in self.label_columns:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _split_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(inputs without the label columns, {column: (B, ...) tensor})``."""
        missing = [c for c in self.label_columns if c not in inputs]
        if missing:
            raise KeyError(
                f"batch has no label column(s) {missing} (keys: {sorted(inputs)}); a custom data_collator must keep "
                f"{list(self.label_columns)}, as {self.collator_class.__name__} does"
            )
        labels = {c: inputs[c] for c in self.label_columns}
        return {k: v for k, v in inputs.items() if k not in labels}, labels

    # ------------------------------------------------------------------ forwards

    @staticmethod
    def _forward_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
        # input_ids / attention_mask (2B, T) and whatever else the collator gives the model;
        # labels (2B, T): the completion tokens, -100 elsewhere.
        kwargs = {k: v for k, v in inputs.items() if k not in _TRL_NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        kwargs["labels"] = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return kwargs

    def _policy_is_peft(self) -> bool:
        # accelerate's is_peft_model re-reads package metadata on every call (~3 ms on CPU, twice a
        # step: 10-20 % of a tiny model's step); the answer cannot change during training.
        cached = getattr(self, "_policy_is_peft_cache", None)
        if cached is None or cached[0] is not self.model:
            cached = (self.model, is_peft_model(self.model))
            self._policy_is_peft_cache = cached
        return cached[1]

    def _reference_logps(self, model_kwargs: dict[str, Any], labels: dict[str, torch.Tensor],
                         model=None) -> torch.Tensor:
        """One no-grad forward of the reference -> ``(2B,)`` sums: a separate model, the policy
        with its adapter off (or on its ``ref`` adapter), or ``model`` when given (TRL's precompute)."""
        seq_len = model_kwargs["labels"].size(1) - 1
        adapter = contextlib.nullcontext()
        policy_is_peft = self._policy_is_peft()
        if self.ref_model is None and policy_is_peft:
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        if model is None:
            if self.ref_model is not None:
                model = self.ref_model
            elif policy_is_peft:
                model = self.model
            else:
                raise RuntimeError("no reference: pass ref_model, use PEFT, or set precompute_ref_log_probs=True")
        no_checkpointing = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_checkpointing, adapter:
            # The hook runs without gradients too: nothing of the reference forward is trained.
            kwargs = self.condition_model_inputs(model, dict(model_kwargs), labels, reference=True)
            # The frozen reference needs no router logits (TRL drops them too).
            kwargs.pop("output_router_logits", None)
            outputs = model(**kwargs, fused_lm_head=True)
        # Prompt-learning PEFT and conditioning hooks prepend positions: keep the last T-1.
        return outputs.log_probs[:, -seq_len:].sum(dim=1)

    # ------------------------------------------------------------------ reference cache

    def _reference_cache_reason(self) -> str | None:
        """Why the reference's sums cannot be memoised exactly here (None: they can)."""
        if self.ref_model is not None:
            return "the reference is a separate model"
        if not self._policy_is_peft():
            return "the policy is not a PEFT model (its reference is not the frozen base model)"
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in unwrapped.peft_config:
            return "the reference is a 'ref' adapter"
        if (type(self).condition_model_inputs is not LabelledPreferenceTrainer.condition_model_inputs
                and self.conditions_reference_inputs):
            return f"{type(self).__name__} conditions the model's inputs (the reference's inputs are not the batch's)"
        active = [n for n, m in unwrapped.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0
                  and "lora_dropout" not in n]  # LoRA dropout is off with the adapter
        config = unwrapped.get_base_model().config
        if active or any(getattr(config, k, 0) or 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
            return "the base model has active dropout (its reference forward is random)"
        from llm_safepref.core.fingerprint import local_model_folder

        if local_model_folder(config._name_or_path) is None:
            return f"the base model {config._name_or_path!r} is not a local folder (nothing to fingerprint)"
        return None

    def _reference_cache(self):
        """The :class:`~llm_safepref.methods.base.reference_cache.ReferenceLogpsCache` of this run, or None."""
        state = getattr(self, "_ref_cache_state", None)
        if state is not None:
            return state[0]
        cache, reason = None, None
        if not getattr(self.args, "reference_logps_cache", False):
            reason = "reference_logps_cache: false"
        else:
            reason = self._reference_cache_reason()
        if reason is None:
            from llm_safepref.core.fingerprint import local_model_folder
            from llm_safepref.core.provenance import run_record
            from llm_safepref.methods.base.reference_cache import ReferenceLogpsCache, key_material

            base = self.accelerator.unwrap_model(self.model).get_base_model()
            autocast = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else None
            record = key_material(local_model_folder(base.config._name_or_path), base, autocast=autocast,
                                  device_type=self.accelerator.device.type)
            provenance = {k: v for k, v in run_record().items() if k in ("command", "git_revision", "date", "machine")}
            cache = ReferenceLogpsCache(record, rank=self.accelerator.process_index, provenance=provenance)
        self._ref_cache_state = (cache, reason)
        return cache

    def reference_cache_report(self) -> dict[str, Any]:
        """Hits and misses of the reference cache (``run_metrics.json``: ``reference_cache``)."""
        state = getattr(self, "_ref_cache_state", None)
        if state is None:
            self._reference_cache()
            state = self._ref_cache_state
        cache, reason = state
        return cache.report() if cache is not None else {"enabled": False, "reason": reason}

    def compute_ref_log_probs(self, model, inputs):
        # TRL's precompute pass (its batches come from our collator) and anyone calling it:
        # the same reference forward as in training, under autocast as TRL's.
        model_inputs, labels = self._split_batch(inputs)
        with self.accelerator.autocast():
            ref_logps = self._reference_logps(self._forward_kwargs(model_inputs), labels, model=model)
        return ref_logps.chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_inputs, labels = self._split_batch(inputs)
        model_kwargs = self._forward_kwargs(model_inputs)
        seq_len = model_kwargs["labels"].size(1) - 1

        # One policy forward and one reference forward over [chosen; rejected] -> (2B,) sums.
        policy_kwargs = self.condition_model_inputs(model, dict(model_kwargs), labels, reference=False)
        if self.aux_loss_enabled:
            # MoE: ask for router logits so that the output carries the load-balancing loss.
            policy_kwargs["output_router_logits"] = True
        outputs = model(**policy_kwargs, fused_lm_head=True)
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps)
        else:
            cache = self._reference_cache()
            ref_logps = cache.get(model_kwargs, logps.device) if cache is not None else None
            if ref_logps is None:
                ref_logps = self._reference_logps(model_kwargs, labels)
                if cache is not None:
                    cache.put(model_kwargs, ref_logps)
        pair = PairForward(logps=logps, ref_logps=ref_logps, labels=labels, outputs=outputs,
                           completion_mask=inputs["completion_mask"][:, 1:], mode=mode)

        sums = BatchSums()
        loss = self.compute_pair_loss(pair, sums)
        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            sums.ratio(Metric.AUX_LOSS, aux_loss, 1.0)
        self._pair_metrics(pair, sums, model_inputs)
        self._record(mode, sums)
        if return_outputs:
            return loss, {"logps": logps.detach(), "ref_logps": ref_logps.detach(), **pair.extras}
        return loss

    # ------------------------------------------------------------------ metrics

    def _pair_metrics(self, pair: PairForward, sums: BatchSums, model_inputs: dict[str, Any]) -> None:
        """DPOTrainer's metrics, as sums: rewards/*, logps/*, entropy, logits/*, token accuracy, tokens."""
        scale = self.reward_scale
        chosen_logps, rejected_logps = pair.chosen_logps.detach(), pair.rejected_logps.detach()
        chosen_rewards = scale * (chosen_logps - pair.ref_chosen_logps)  # (B,)
        rejected_rewards = scale * (rejected_logps - pair.ref_rejected_logps)
        sums.mean(Metric.REWARDS_CHOSEN, chosen_rewards)
        sums.mean(Metric.REWARDS_REJECTED, rejected_rewards)
        sums.mean(Metric.REWARDS_ACCURACY, chosen_rewards > rejected_rewards)
        sums.mean(Metric.REWARDS_MARGIN, chosen_rewards - rejected_rewards)
        sums.mean(Metric.LOGPS_CHOSEN, chosen_logps)
        sums.mean(Metric.LOGPS_REJECTED, rejected_logps)

        outputs, mask = pair.outputs, pair.completion_mask  # mask (2B, T-1)
        seq_len = mask.size(1)
        chosen_mask = mask.chunk(2)[0]
        if getattr(outputs, "entropy", None) is not None:
            sums.ratio(Metric.ENTROPY, (outputs.entropy[:, -seq_len:].detach() * mask).sum(), mask.sum())
        if getattr(outputs, "mean_logits", None) is not None:
            # Per-token fields are 0 outside the completion, so masked sums need no boolean indexing (no sync).
            chosen_logits, rejected_logits = (outputs.mean_logits[:, -seq_len:].detach() * mask).chunk(2)
            rejected_mask = mask.chunk(2)[1]
            sums.ratio(Metric.LOGITS_CHOSEN, chosen_logits.sum(), chosen_mask.sum())
            sums.ratio(Metric.LOGITS_REJECTED, rejected_logits.sum(), rejected_mask.sum())
        if getattr(outputs, "is_top1", None) is not None:
            chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2)[0] & chosen_mask.bool()
            sums.ratio(Metric.MEAN_TOKEN_ACCURACY, chosen_top1.sum(), chosen_mask.sum())
        if "attention_mask" in model_inputs:
            sums.raw(NUM_TOKENS, model_inputs["attention_mask"].sum())

    def _record(self, mode: str, sums: BatchSums) -> None:
        """Reduce this micro-batch's sums (one collective, one host sync) into metrics and nu's step sums."""
        metrics, raw = sums.reduce(lambda t: self.accelerator.reduce(t, reduction="sum"))
        store = self._metrics[mode]
        for name, value in metrics.items():
            store[name].append(value)
        if mode == "train" and NUM_TOKENS in raw:
            # Tensor-parallel ranks see the same batch: count its tokens once.
            self._total_train_tokens += int(raw[NUM_TOKENS]) // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]
        callback = self.lagrange_callback
        if callback is None:
            return
        if mode == "train" and torch.is_grad_enabled() and CONSTRAINT_WEIGHT in raw:
            callback.accumulate(raw[CONSTRAINT_SUM], raw[CONSTRAINT_WEIGHT])
        if mode == "eval":
            store[Metric.NU].append(callback.multiplier.value)
