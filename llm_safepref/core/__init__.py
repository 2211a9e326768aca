"""The torch-and-numpy core that the token-level trainers and ``control/`` both import.

Importing it loads no trl, transformers, peft or datasets (a test checks ``sys.modules``).

* :mod:`~llm_safepref.core.losses`: CPL, DPO, Bradley–Terry, the safety-label terms,
  PRESA's Lagrangian, the loss registry. Pure functions of per-segment log-prob sums ``(B,)``.
* :mod:`~llm_safepref.core.lagrange`: the Lagrange multiplier (probability or cost-budget
  constraint; PID variant), its ``state_dict`` the same in both worlds' checkpoints.
* :mod:`~llm_safepref.core.latent`: reparameterisation, Gaussian KL, the prior and its
  stage-2 penalty, the pair-set encoder, the cyclic KL schedule (VPL / Safe-CPL).
* :mod:`~llm_safepref.core.stats`: intervals over prompts / episodes, paired comparisons,
  mean ± std and two-level bootstrap over seeds, judge-error correction.
* :mod:`~llm_safepref.core.schema`: shared column and metric names.
* :mod:`~llm_safepref.core.provenance`: the run record (command, git revision, versions,
  lock hash, machine, date) and secret redaction; :mod:`~llm_safepref.core.paths`: the cache
  root; :mod:`~llm_safepref.core.jsonl`: JSONL files read with file / line errors;
  :mod:`~llm_safepref.core.tables`: Markdown / console tables; :mod:`~llm_safepref.core.cli`:
  the flag convention.
"""

from llm_safepref.core.lagrange import LagrangeMultiplier, PIDLagrangeMultiplier
from llm_safepref.core.latent import (
    CyclicKLSchedule,
    GaussianPrior,
    PairSetEncoder,
    compose_latent,
    gaussian_kl,
    prior_penalty,
    reparameterize,
)
from llm_safepref.core.losses import (
    LOSS_REGISTRY,
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    cpl_loss,
    dpo_loss,
    get_loss,
    get_preference_loss,
    presa_lagrangian,
    safety_loss,
    safety_margin,
    safety_prob,
    weighted_mean,
)
from llm_safepref.core.paths import cache_root
from llm_safepref.core.provenance import redact, run_record, write_json
from llm_safepref.core.schema import SAFETY_LABEL_COLUMNS, USER_ID, Metric

__all__ = [
    "LOSS_REGISTRY", "PREFERENCE_LOSSES", "SAFETY_LABEL_COLUMNS", "USER_ID",
    "CyclicKLSchedule", "GaussianPrior", "LagrangeMultiplier", "Metric", "PIDLagrangeMultiplier", "PairSetEncoder",
    "bradley_terry_loss", "cache_root", "compose_latent", "cpl_loss", "dpo_loss", "gaussian_kl", "get_loss",
    "get_preference_loss", "presa_lagrangian", "prior_penalty", "redact", "reparameterize", "run_record",
    "safety_loss", "safety_margin", "safety_prob", "weighted_mean", "write_json",
]
