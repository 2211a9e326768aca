"""Configuration of :class:`~llm_safepref.methods.safe_cpl.trainer.SafeCPLTrainer` (Safe-CPL, stage 1).

Design decisions:

* ``SafeCPLConfig`` extends :class:`~llm_safepref.methods.presa.PresaConfig`, itself a
  :class:`~llm_safepref.methods.base.LabelledPreferenceConfig`. The preference term
  (``pref_loss``, ``cpl_alpha``, ``cpl_bias``, ``cpl_reference``, ``beta``), PRESA's optional
  safety term (``safety_beta``, ``safety_ref_point``, ``safety_delta``, the class weights,
  ``safety_exclude_safe_rejected``) and the multiplier (``nu_*``, from the base) are therefore
  *the same fields* as PRESA's: one definition, one help text, one validation. A mixin shared
  with ``PresaConfig`` would say the same thing but needs an edit of ``presa/config.py``; the
  subclass needs none. The safety fields are used only with ``safety_term=True``.
* Safe-CPL's own knobs (Lin & Brown, ICML 2026; VPL, Poddar et al., NeurIPS 2024): the latent
  ``z`` (``latent_dim`` <= 16), its encoder (``encoder_hidden_size``, ``encoder_num_heads``,
  ``freeze_encoder``), the prior (``prior``: learned / standard), the soft prompt
  (``n_soft_tokens``, ``projection_hidden_size``), the context sets (``context_min`` ..
  ``context_max`` pairs of the same user, ``context_seed``), the frozen context embedder
  (``context_encoder``: the policy's base model or MiniLM), the KL term (``kl_weight`` with
  ``kl_cycles`` of cyclic annealing) and the annotator column (``user_column``).
* ``ddp_find_unused_parameters`` defaults to (and must be) False: the prior is trained through
  the KL term alone, which DDP's unused-parameter search cannot see (it follows the model's
  outputs), and every trained parameter is used in every step.
* Defaults follow the authors' control code where it has a setting (latent size 4, learned
  prior, KL weight 1e-3 with 4 annealing cycles) and VPL's language-model code otherwise
  (2-8 context pairs, last-token embeddings of the frozen LM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_safepref.core.schema import USER_ID
from llm_safepref.methods.base.config import require
from llm_safepref.methods.presa.config import PresaConfig

__all__ = ["CONTEXT_ENCODERS", "MAX_LATENT_DIM", "PRIORS", "SafeCPLConfig"]

#: Largest latent size accepted (see the ``latent_dim`` help for why).
MAX_LATENT_DIM = 16
#: Frozen embedders of the context pairs (``llm_safepref.methods.safe_cpl.embeddings``).
CONTEXT_ENCODERS = ("policy", "minilm")
#: ``prior`` values: a trainable Gaussian or the standard normal.
PRIORS = ("learned", "standard")


@dataclass
class SafeCPLConfig(PresaConfig):
    r"""Configuration for :class:`~llm_safepref.methods.safe_cpl.trainer.SafeCPLTrainer`.

    Every ``DPOConfig`` / ``TrainingArguments`` field and every :class:`PresaConfig` field is
    accepted; the PRESA safety fields matter only with ``safety_term=True``.
    """

    _trainer_name = "SafeCPLTrainer"
    _loss_option = "pref_loss ('cpl' or 'dpo') + the KL term (kl_weight)"

    # ---------------------------------------------------------------- changed default
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters; must stay False for Safe-CPL (transformers would turn it on). "
            "The learned prior gets its gradient through the KL term only, which is not a model output: DDP's "
            "search for unused parameters would mark the prior unused at the end of the forward, then meet its "
            "gradient in the backward ('marked as ready twice') and stop. Every trained parameter is used in every "
            "step, so the search is not needed."
        },
    )

    # ---------------------------------------------------------------- the latent user variable
    latent_dim: int = field(
        default=4,
        metadata={
            "help": f"Size d of the latent user variable z (1..{MAX_LATENT_DIM}; the authors use 4). z is inferred "
            "from 2-8 annotated pairs of one user, each a fraction of a bit of information, so a larger z is not "
            "identifiable from a context set, and stage 2 searches over z: every extra dimension makes that search "
            "harder without adding a skill."
        },
    )
    prior: str = field(
        default="learned",
        metadata={
            "help": "Prior p(z): 'learned' (a Gaussian with trainable mean and log-variance, as the authors' code) or "
            "'standard' (fixed N(0, I)). The KL term pulls q(z | context) toward it; stage 2 composes z from it."
        },
    )
    encoder_hidden_size: int = field(
        default=256,
        metadata={"help": "Hidden size of the pair-set encoder q(z | context) (per-pair MLP and attention; VPL: 256)."},
    )
    encoder_num_heads: int = field(
        default=4,
        metadata={"help": "Attention heads of the encoder's self-attention over the context pairs (divides "
                          "encoder_hidden_size)."},
    )
    freeze_encoder: bool = field(
        default=False,
        metadata={
            "help": "Keep the encoder and the prior fixed (no gradient; e.g. a conditioner loaded from an earlier run "
            "through SafeCPLTrainer(conditioner=...), as the authors' Safe-CPL freezes the VPL encoder). Default: "
            "trained jointly with the adapter and the projection, as VPL trains its encoder."
        },
    )

    # ---------------------------------------------------------------- the soft prompt
    n_soft_tokens: int = field(
        default=4,
        metadata={
            "help": "Number P of soft-prompt vectors that z is projected to; they are prepended to the policy's input "
            "embeddings (never to the reference's)."
        },
    )
    projection_hidden_size: int = field(
        default=256,
        metadata={"help": "Hidden size of the projection z -> (n_soft_tokens, model hidden size): Linear, tanh, "
                          "Linear."},
    )

    # ---------------------------------------------------------------- context sets
    user_column: str = field(
        default=USER_ID,
        metadata={"help": "Dataset column naming the annotator of each pair (Safe-CPL's user); the datasets of "
                          "llm_safepref.crowd call it 'user_id'."},
    )
    context_min: int = field(
        default=2,
        metadata={"help": "Fewest annotated pairs of the same user in an example's context set (VPL: 2)."},
    )
    context_max: int = field(
        default=8,
        metadata={
            "help": "Most annotated pairs of the same user in a context set (VPL: 8). Every user needs at least this "
            "many pairs on prompts other than the example's own."
        },
    )
    context_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the context-set draw (llm_safepref.crowd.add_context_sets), used when a dataset has no "
            "context_pair_ids column yet; the draw of an example depends only on (seed, user, pair)."
        },
    )
    context_encoder: str = field(
        default="policy",
        metadata={
            "help": "Frozen embedder of the context pairs' texts, run once per text and cached: 'policy' (the "
            "policy's base model without adapter or soft prompt, last-token hidden state: VPL's choice, works for "
            "any model, sees the texts in the policy's own tokenisation) or 'minilm' (the judge's MiniLM sentence "
            "encoder, 384 dims, cheaper for a large policy)."
        },
    )
    context_max_tokens: int = field(
        default=256,
        metadata={"help": "Truncation of each context text for the 'policy' embedder, in tokens."},
    )
    context_include_prompt: bool = field(
        default=True,
        metadata={
            "help": "Pair features [e_prompt, e_chosen, e_rejected] (True) or [e_chosen, e_rejected] (False). The "
            "order chosen-then-rejected carries the label either way."
        },
    )
    embed_batch_size: int = field(
        default=16,
        metadata={"help": "Texts per forward when the context embeddings are computed (once; cached)."},
    )

    # ---------------------------------------------------------------- the loss
    kl_weight: float = field(
        default=1e-3,
        metadata={
            "help": "Largest weight of KL(q(z | context) || p(z)) in the loss (the authors' control code: 1e-3; VPL's "
            "language models: 1e-4 .. 3e-6). The weight follows cyclic cosine annealing (kl_cycles)."
        },
    )
    kl_cycles: int = field(
        default=4,
        metadata={
            "help": "Cycles of the KL weight's annealing over the run (Fu et al., 2019; VPL and the authors use 4): "
            "each rises from 0 to kl_weight along a half cosine over its first kl_cycle_ratio, then stays. 0: "
            "constant kl_weight."
        },
    )
    kl_cycle_ratio: float = field(
        default=0.5,
        metadata={"help": "Share of each annealing cycle spent rising (0, 1]."},
    )
    safety_term: bool = field(
        default=False,
        metadata={
            "help": "Add PRESA's Lagrangian safety term on the per-response labels chosen_is_safe / rejected_is_safe "
            "(the PresaConfig fields safety_beta, safety_delta, safety_*_weight, safety_ref_point and nu_*). Off: "
            "Safe-CPL proper, where safety comes only from the crowd's preferences."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.latent_dim, int) and 1 <= self.latent_dim <= MAX_LATENT_DIM,
                f"latent_dim must be an integer in 1..{MAX_LATENT_DIM}, got {self.latent_dim!r}: z is inferred from "
                f"{self.context_min}-{self.context_max} pairs of one user, too little information to identify more "
                "dimensions, and stage 2 searches over z (the authors use 4)")
        require(self.prior in PRIORS, f"prior must be one of {PRIORS}, got {self.prior!r}")
        require(self.encoder_hidden_size > 0, f"encoder_hidden_size must be > 0, got {self.encoder_hidden_size}")
        require(self.encoder_num_heads > 0 and self.encoder_hidden_size % self.encoder_num_heads == 0,
                f"encoder_num_heads must be > 0 and divide encoder_hidden_size={self.encoder_hidden_size}, got "
                f"{self.encoder_num_heads}")
        require(self.n_soft_tokens >= 1, f"n_soft_tokens must be >= 1, got {self.n_soft_tokens}")
        require(self.projection_hidden_size > 0,
                f"projection_hidden_size must be > 0, got {self.projection_hidden_size}")
        require(isinstance(self.user_column, str) and self.user_column.strip() != "",
                f"user_column must name a dataset column, got {self.user_column!r}")
        require(1 <= self.context_min <= self.context_max,
                f"context_min / context_max must satisfy 1 <= context_min <= context_max, got "
                f"{self.context_min} / {self.context_max}")
        require(self.context_encoder in CONTEXT_ENCODERS,
                f"context_encoder must be one of {CONTEXT_ENCODERS}, got {self.context_encoder!r}")
        require(self.context_max_tokens >= 1, f"context_max_tokens must be >= 1, got {self.context_max_tokens}")
        require(self.embed_batch_size >= 1, f"embed_batch_size must be >= 1, got {self.embed_batch_size}")
        require(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        require(self.kl_cycles >= 0, f"kl_cycles must be >= 0, got {self.kl_cycles}")
        require(0 < self.kl_cycle_ratio <= 1, f"kl_cycle_ratio must lie in (0, 1], got {self.kl_cycle_ratio}")
        require(not self.ddp_find_unused_parameters,
                "ddp_find_unused_parameters must be False for SafeCPLTrainer: the learned prior is reached only "
                "through the KL term, not through the model's outputs, so DDP's unused-parameter search would mark "
                "it unused and then fail on its gradient; every trained parameter is used in every step")

    @property
    def context_size(self) -> tuple[int, int]:
        """``(context_min, context_max)``, the form ``llm_safepref.crowd`` takes."""
        return self.context_min, self.context_max
