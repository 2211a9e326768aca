"""Safe-CPL stage 1 on TRL: ``SafeCPLTrainer``, a latent-user-conditioned policy learned from crowd preferences.

Safe-CPL (Lin & Brown, ICML 2026, arXiv 2605.21822), stage 1, at token level: a policy
``pi(y | x, z)`` conditioned on a latent user variable ``z``, learned from the preference pairs
of a crowd of users. For an example ``(user u, pair sigma+ > sigma-)``:

    q(z | C_u) = N(mu, diag(sigma^2)) = encoder(context set C_u of u's OTHER pairs)
    z = mu + sigma * eps,   eps ~ N(0, I) from the example's own seeded generator
    loss = L_pref(S(sigma+ | z), S(sigma- | z)) + w_KL(step) * KL(q(z | C_u) || p(z))
           [+ nu * (delta - E[p(y | sigma)])  with safety_term: PRESA's Lagrangian]

with ``S`` the completion log-prob sum, ``L_pref`` CPL or DPO (``llm_safepref.core.losses``),
``w_KL`` the cyclic cosine schedule and ``p(z)`` the (learned) prior.

Design decisions:

* It is :class:`~llm_safepref.methods.presa.PresaTrainer` (itself on the shared base) plus the
  conditioning: with ``safety_term=True`` the loss is PRESA's very ``compute_pair_loss`` + the
  KL term, so the safety term, its class weights, the KTO reference point and the multiplier
  are PRESA's code, not a copy. Without it the preference term is the core's CPL / DPO and no
  multiplier is built.
* ``z`` conditions the policy through a soft prompt: the
  :class:`~llm_safepref.methods.safe_cpl.model.LatentConditioner` projects ``z`` to
  ``n_soft_tokens`` vectors prepended to the input embeddings. :meth:`condition_model_inputs`
  hands the context features to the policy forward as extra keyword arguments (and extends
  ``attention_mask`` / ``labels`` by the soft prompt's positions); a forward pre-hook on the
  policy's backbone runs the conditioner and builds ``inputs_embeds``. The conditioner thus
  runs inside the DDP-wrapped forward, as DDP requires of trained parameters (called before
  the forward, DDP marks its gradients ready twice and stops).
  **The reference sees no soft prompt**: it is the base model without adapter and without
  user tokens (as P-DPO), so ``S - S_ref`` measures what the adapter *and* ``z`` add.
* The conditioner is registered on the model before PEFT wraps it and named in
  ``modules_to_save``: it is trained with the LoRA adapter (one optimiser), reduced by DDP,
  saved in every checkpoint's ``adapter_model.safetensors`` and restored on resume. The
  encoder is trained jointly (VPL) unless ``freeze_encoder``.
* Context pairs are embedded ONCE by a frozen embedder
  (:mod:`~llm_safepref.methods.safe_cpl.embeddings`, cached on disk by encoder id and text
  hash) into a feature table that stays on the device; a batch carries only row indices.
* Noise: per example, from a generator seeded by ``(args.seed, example index, global step)``
  (:func:`~llm_safepref.methods.safe_cpl.model.example_noise`). The example index is collated
  as a host list (no device sync), so one process and two draw the same ``eps`` for the same
  example at the same step, and a resumed run draws what the uninterrupted one drew.
  Evaluation uses ``z = mu`` (no noise).
* Metrics (``llm_safepref.core.schema.Metric``, on the base's one reduction per micro-batch):
  ``loss/preference``, ``loss/kl`` (the weighted term added to the loss), ``latent/kl`` (the
  mean KL), ``latent/kl_weight``, plus PRESA's ``safety/*`` and ``lagrange/*`` with the safety term.
"""

from __future__ import annotations

import copy
import logging
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model

from llm_safepref.core.latent import CyclicKLSchedule
from llm_safepref.core.losses import cpl_loss, dpo_loss
from llm_safepref.core.schema import Metric
from llm_safepref.data_checks import SAFETY_LABEL_COLUMNS, check_presa_dataset
from llm_safepref.methods.base.metrics import BatchSums
from llm_safepref.methods.base.trainer import LabelledPreferenceCollator, PairForward
from llm_safepref.methods.presa.trainer import PresaTrainer
from llm_safepref.methods.safe_cpl.config import SafeCPLConfig
from llm_safepref.methods.safe_cpl.data import CONTEXT_INDEX, EXAMPLE_INDEX, ContextPool, prepare_context_dataset
from llm_safepref.methods.safe_cpl.embeddings import ContextEmbedder, pair_features
from llm_safepref.methods.safe_cpl.model import (
    CONDITIONER_NAME,
    ConditionerConfig,
    LatentConditioner,
    attach_conditioner,
    conditioner_of,
    example_noise,
    extend_for_soft_prompt,
    soft_prompt_embeds,
)

__all__ = ["LatentSample", "SafeCPLCollator", "SafeCPLTrainer"]

logger = logging.getLogger(__name__)

# Extra keyword arguments of the policy forward, consumed by the backbone's pre-hook (never reach the model).
_FEATURES_KW = "safe_cpl_context_features"
_MASK_KW = "safe_cpl_context_mask"
_NOISE_KW = "safe_cpl_noise"


@dataclass
class SafeCPLCollator(LabelledPreferenceCollator):
    """The base collator, with :data:`EXAMPLE_INDEX` kept as a host ``list[int]``.

    A list is not moved to the accelerator by accelerate / the Trainer, so the example's noise
    is drawn from it without a device-to-host sync. Everything else is the base's: the context
    indices become a ``(B, K)`` int64 tensor, safety labels ``(B,)`` bool tensors.
    """

    def collate_label(self, column: str, values: list[Any]):
        if column == EXAMPLE_INDEX:
            return [int(v) for v in values]
        return super().collate_label(column, values)


@dataclass
class LatentSample:
    """The latent of one micro-batch's policy forward: ``(B, d)`` each and the ``(B,)`` KL."""

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    kl: torch.Tensor


class SafeCPLTrainer(PresaTrainer):
    """Trainer for Safe-CPL stage 1: a LoRA policy conditioned on a latent user ``z`` by a soft prompt.

    Takes the arguments of :class:`trl.DPOTrainer` with a :class:`SafeCPLConfig`, a *base*
    model (or its name) and a ``peft_config`` (the conditioner is added to its
    ``modules_to_save``). The datasets need ``prompt`` / ``chosen`` / ``rejected``, the user
    column (``args.user_column``) and, with ``safety_term``, ``chosen_is_safe`` /
    ``rejected_is_safe``; context sets are drawn when there is no ``context_pair_ids`` column
    (``llm_safepref.crowd.load_crowd_dataset`` builds all of this).

    ``conditioner``: a :class:`LatentConditioner` to start from (e.g. from an earlier
    artefact, with ``freeze_encoder``); by default a new one.
    """

    config_class = SafeCPLConfig
    collator_class = SafeCPLCollator
    default_output_dir = "safe-cpl-output"
    #: The reference forward sees no soft prompt (condition_model_inputs leaves it as it is), so its
    #: sums depend on the batch alone and ``reference_logps_cache`` can memoise them.
    conditions_reference_inputs = False
    _tag_names = ["trl", "safe-cpl", "llm_safepref"]
    _name = "Safe-CPL"
    # Only what methods.md records about the paper (no invented fields).
    _paper = {
        "title": "Implicit Safety Alignment from Crowd Preferences",
        "id": "2605.21822",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @misc{lin2026safecpl,
                title         = {{Implicit Safety Alignment from Crowd Preferences}},
                author        = {Lin and Brown},
                note          = {ICML 2026},
                year          = 2026,
                eprint        = {2605.21822},
                archivePrefix = {arXiv},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: SafeCPLConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None,
                 conditioner: LatentConditioner | None = None, **kwargs):
        if args is None:
            args = self.config_class(self.default_output_dir)
        if not isinstance(args, SafeCPLConfig):
            raise TypeError(f"{type(self).__name__} needs a SafeCPLConfig, got {type(args).__name__}")
        # Instance attribute: the safety labels are collated only when the safety term uses them.
        self.label_columns = (CONTEXT_INDEX, EXAMPLE_INDEX) + (SAFETY_LABEL_COLUMNS if args.safety_term else ())

        model = self._load_base_model(model, args)
        if peft_config is None:
            raise ValueError(
                "SafeCPLTrainer trains a LoRA adapter together with the latent conditioner: pass peft_config "
                "(e.g. peft.LoraConfig(r=16, target_modules='all-linear')); the reference is the base model with the "
                "adapter off and without the soft prompt")
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")

        # Context sets and index columns, before TRL tokenises (bad data fails here, fast).
        train_dataset, train_pool = prepare_context_dataset(train_dataset, args, name="train")
        pools = [train_pool]
        offset = len(train_pool)
        if eval_dataset is not None:
            named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            prepared = {}
            for key, ds in named.items():
                prepared[key], pool = prepare_context_dataset(ds, args, name=str(key), offset=offset)
                pools.append(pool)
                offset += len(pool)
            eval_dataset = prepared if isinstance(eval_dataset, dict) else prepared["eval"]
        self._pools = pools
        self.base_model_name = _base_model_name(model)

        # The conditioner, on the model before PEFT wraps it (modules_to_save: trained, saved, loaded with LoRA).
        hidden = model.get_input_embeddings().weight.shape[1]
        embed_dim = hidden if args.context_encoder == "policy" else 384
        pair_dim = embed_dim * (3 if args.context_include_prompt else 2)
        self._fresh_conditioner = conditioner is None
        if conditioner is None:
            with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG is left as it was
                torch.manual_seed(args.seed)
                conditioner = LatentConditioner(ConditionerConfig(
                    pair_dim=pair_dim, latent_dim=args.latent_dim, n_soft_tokens=args.n_soft_tokens,
                    hidden_size=hidden, encoder_hidden_size=args.encoder_hidden_size,
                    encoder_num_heads=args.encoder_num_heads, projection_hidden_size=args.projection_hidden_size,
                    prior_learned=args.prior == "learned"))
            conditioner.init_soft_prompt(model.get_input_embeddings().weight, seed=args.seed)
        else:
            _check_given_conditioner(conditioner, pair_dim=pair_dim, hidden=hidden, args=args)
        attach_conditioner(model, conditioner)
        peft_config = copy.deepcopy(peft_config)
        peft_config.modules_to_save = list(dict.fromkeys([*(peft_config.modules_to_save or []), CONDITIONER_NAME]))

        self._latent: LatentSample | None = None
        self._kl_schedule: CyclicKLSchedule | None = None
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         peft_config=peft_config, **kwargs)

        # Context features: embedded once (rank 0 fills the disk cache, the others read it), kept on the device.
        self.context_embedder = ContextEmbedder.from_name(
            args.context_encoder, model=self.model, tokenizer=self.processing_class,
            max_tokens=args.context_max_tokens, batch_size=args.embed_batch_size)
        with self.accelerator.main_process_first():
            tables = [pair_features(self.context_embedder, p.prompts, p.chosen, p.rejected,
                                    include_prompt=args.context_include_prompt) for p in pools]
        self._context_table = torch.cat(tables).to(self.accelerator.device)  # (rows of all pools, D)
        active = self.conditioner
        if self._fresh_conditioner:
            train_features = tables[0]
            active.set_feature_stats(train_features.mean(0), train_features.std(0, unbiased=False))
        backbone = self.model.get_base_model().base_model  # e.g. LlamaModel, called inside the forward
        self._hook_handle = backbone.register_forward_pre_hook(self._conditioning_hook, with_kwargs=True)
        if args.freeze_encoder:
            active.frozen_encoder = True
            for module in (active.encoder, active.prior):
                module.requires_grad_(False)

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _load_base_model(model, args: SafeCPLConfig):
        if isinstance(model, str):
            from trl.trainer.utils import create_model_from_path

            from llm_safepref.models import resolve_model_name

            kwargs = dict(args.model_init_kwargs or {})
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(resolve_model_name(model), **kwargs)
        if is_peft_model(model):
            raise ValueError(
                "SafeCPLTrainer needs the base model and a peft_config, not a PeftModel: the latent conditioner must "
                "be registered on the base model before PEFT wraps it (so that it is saved with the adapter)")
        return model

    @property
    def conditioner(self) -> LatentConditioner:
        """The trained :class:`LatentConditioner` (PEFT's active copy)."""
        return conditioner_of(self.model)

    @property
    def pools(self) -> list[ContextPool]:
        """The context pools (train first, then each eval dataset), in feature-table order."""
        return list(self._pools)

    def check_dataset(self, dataset, name: str) -> None:
        # Called by TRL's preparation, inside __init__ before self.args exists: the label columns tell.
        if SAFETY_LABEL_COLUMNS[0] in self.label_columns:
            check_presa_dataset(dataset, name=name)
        # The index columns (and, with the safety term, the labels) must be there.
        super(PresaTrainer, self).check_dataset(dataset, name)

    def constraint_threshold(self, args: SafeCPLConfig) -> float | None:
        return args.safety_delta if args.safety_term else None

    # ------------------------------------------------------------------ conditioning

    def condition_model_inputs(self, model, model_kwargs: dict[str, Any], labels: dict[str, Any], *,
                               reference: bool) -> dict[str, Any]:
        """The policy forward gets the context features, their mask and the noise as extra keyword
        arguments, and ``attention_mask`` / ``labels`` extended by the ``P`` soft-prompt positions; the
        backbone's pre-hook (:meth:`_conditioning_hook`) turns them into the soft prompt. The reference
        forward is left as it is: the base model, no adapter, no soft prompt (as P-DPO)."""
        if reference:
            return model_kwargs
        index = labels[CONTEXT_INDEX]  # (B, K) int64, -1 = padding
        model_kwargs[_FEATURES_KW] = self._context_table[index.clamp(min=0)]  # (B, K, D)
        model_kwargs[_MASK_KW] = index >= 0
        if model.training:
            model_kwargs[_NOISE_KW] = example_noise(self.args.seed, labels[EXAMPLE_INDEX], self.state.global_step,
                                                    self.args.latent_dim).to(self._context_table.device)
        return extend_for_soft_prompt(model_kwargs, self.args.n_soft_tokens)

    def _conditioning_hook(self, backbone, args, kwargs):
        """Forward pre-hook of the policy's backbone: context -> q(z) -> z -> soft prompt, as ``inputs_embeds``.

        Why a hook: it runs INSIDE the (DDP-wrapped) model's forward, so DDP sees the conditioner's
        parameters used in its forward and reduces their gradients; a conditioner called before the
        forward (in :meth:`condition_model_inputs`) breaks DDP's gradient bookkeeping.
        """
        features = kwargs.pop(_FEATURES_KW, None)
        if features is None:
            return None  # the reference, generation, anyone else: unchanged
        mask, noise = kwargs.pop(_MASK_KW), kwargs.pop(_NOISE_KW, None)
        if "input_ids" in kwargs:
            input_ids = kwargs.pop("input_ids")
        else:  # positional input_ids (TRL and the base pass keywords; kept for other callers)
            input_ids, args = args[0], args[1:]
        conditioner = self.conditioner
        soft, mu, logvar, z = conditioner(features, mask, noise)  # (B, P, H), (B, d) x 3
        self._latent = LatentSample(mu=mu, logvar=logvar, z=z, kl=conditioner.kl(mu, logvar))
        # Rows i and B + i are the chosen and rejected response of pair i: the same user, the same z.
        kwargs["inputs_embeds"] = soft_prompt_embeds(torch.cat([soft, soft]), input_ids,
                                                     backbone.get_input_embeddings())
        return args, kwargs

    # ------------------------------------------------------------------ the loss

    def kl_weight_at(self, step: int) -> float:
        """The KL weight at optimiser step ``step`` (cyclic cosine annealing over the run's max_steps)."""
        total = self.state.max_steps
        if not total or total <= 0:
            return self.args.kl_weight
        if self._kl_schedule is None or self._kl_schedule.total_steps != total:
            self._kl_schedule = CyclicKLSchedule(max_weight=self.args.kl_weight, total_steps=total,
                                                 n_cycles=self.args.kl_cycles, ratio=self.args.kl_cycle_ratio)
        return self._kl_schedule(step)

    def _preference_losses(self, pair: PairForward) -> torch.Tensor:
        """CPL / DPO per pair ``(B,)`` on the conditioned policy's sums (as PRESA's preference term)."""
        args = self.args
        if args.pref_loss == "dpo":
            return dpo_loss(pair.chosen_logps, pair.rejected_logps, pair.ref_chosen_logps, pair.ref_rejected_logps,
                            beta=self.beta)
        if args.cpl_reference:
            return cpl_loss(pair.chosen_logps - pair.ref_chosen_logps, pair.rejected_logps - pair.ref_rejected_logps,
                            alpha=args.cpl_alpha, bias=args.cpl_bias)
        return cpl_loss(pair.chosen_logps, pair.rejected_logps, alpha=args.cpl_alpha, bias=args.cpl_bias)

    def compute_pair_loss(self, pair: PairForward, sums: BatchSums) -> torch.Tensor:
        latent, self._latent = self._latent, None
        if latent is None:
            raise RuntimeError("no latent for this batch: condition_model_inputs did not run for the policy forward")
        if self.args.safety_term:
            loss = super().compute_pair_loss(pair, sums)  # PRESA's Lagrangian; logs loss/preference, safety/*
        else:
            pref_losses = self._preference_losses(pair)
            loss = pref_losses.mean()
            sums.mean(Metric.PREFERENCE_LOSS, pref_losses)
            pair.extras.update(pref_losses=pref_losses.detach())
        weight = self.kl_weight_at(self.state.global_step)
        kl = latent.kl  # (B,)
        loss = loss + weight * kl.mean()
        sums.mean(Metric.LATENT_KL, kl)
        sums.ratio(Metric.KL_LOSS, weight * kl.detach().sum(), float(kl.numel()))
        sums.ratio(Metric.KL_WEIGHT, weight, 1.0)
        pair.extras.update(mu=latent.mu.detach(), logvar=latent.logvar.detach(), z=latent.z.detach(),
                           kl=kl.detach())
        return loss

    # ------------------------------------------------------------------ users and saving

    @torch.no_grad()
    def user_latents(self) -> dict[str, dict[str, Any]]:
        """Per training user: the mean of the posterior means ``mu`` over the user's training examples
        (each with its own context set, so every z is one the encoder produced in training).

        ``{user: {"z": [d floats], "n_pairs": n}}``; stored in the artefact for ``generate --user``.
        """
        train_pool, dataset = self._pools[0], self.train_dataset
        conditioner = self.conditioner
        index = torch.tensor(dataset[CONTEXT_INDEX], dtype=torch.long, device=self._context_table.device)
        rows = dataset[EXAMPLE_INDEX]
        mus = []
        for start in range(0, len(index), 256):
            block = index[start:start + 256]
            mu, _ = conditioner.encode(self._context_table[block.clamp(min=0)], block >= 0)
            mus.append(mu.float().cpu())
        mu = torch.cat(mus) if mus else torch.zeros(0, conditioner.config.latent_dim)
        users: dict[str, list[torch.Tensor]] = {}
        for row, m in zip(rows, mu):
            users.setdefault(train_pool.user_ids[row], []).append(m)
        return {u: {"z": torch.stack(ms).mean(0).tolist(), "n_pairs": len(ms)} for u, ms in sorted(users.items())}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Adapter + conditioner (one adapter_model.safetensors), tokenizer, lagrange.json (base), then
        # safe_cpl.json: every checkpoint is a loadable artefact.
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            from llm_safepref.methods.safe_cpl.artifact import write_spec

            write_spec(output_dir or self.args.output_dir, self)

    def save_artifact(self, output_dir: str | os.PathLike | None = None, *, dataset_name: str = "crowd",
                      eval_table: dict | None = None, repo_id: str | None = None) -> str:
        """The whole artefact in one folder: adapter + conditioner, tokenizer, ``safe_cpl.json``,
        ``users.json`` (each training user's z), ``lagrange.json`` with the safety term, and a model card."""
        from llm_safepref.methods.safe_cpl.artifact import save_artifact

        return save_artifact(self, output_dir or self.args.output_dir, dataset_name=dataset_name,
                             eval_table=eval_table, repo_id=repo_id)


def _base_model_name(model) -> str:
    """How the artefact names its base: ``"embedded"`` for the embedded model, else its name or path."""
    from pathlib import Path

    from llm_safepref.core.paths import cache_root
    from llm_safepref.models import EMBEDDED_MODEL_NAME

    name = str(getattr(model.config, "_name_or_path", "") or "")
    try:
        if name and Path(name).resolve() == (cache_root() / "models" / EMBEDDED_MODEL_NAME).resolve():
            return "embedded"
    except OSError:
        pass
    return name


def _check_given_conditioner(conditioner: LatentConditioner, *, pair_dim: int, hidden: int,
                             args: SafeCPLConfig) -> None:
    if not isinstance(conditioner, LatentConditioner):
        raise TypeError(f"conditioner must be a LatentConditioner, got {type(conditioner).__name__}")
    c = conditioner.config
    expected = {"pair_dim": pair_dim, "hidden_size": hidden, "latent_dim": args.latent_dim,
                "n_soft_tokens": args.n_soft_tokens}
    wrong = {k: (getattr(c, k), v) for k, v in expected.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError("the given conditioner does not fit this run: " + ", ".join(
            f"{k}={have} (this run: {want})" for k, (have, want) in wrong.items()))
