"""Column and metric names shared by the text trainers and ``control/``.

Datasets use TRL's preference columns (``prompt`` / ``chosen`` / ``rejected``) plus one safety
label per response and, for crowd data, the annotator. Logged metrics use the same names in
both worlds so that plots line up.
"""

from __future__ import annotations

__all__ = [
    "PROMPT", "CHOSEN", "REJECTED", "CHOSEN_IS_SAFE", "REJECTED_IS_SAFE", "USER_ID",
    "PREFERENCE_COLUMNS", "SAFETY_LABEL_COLUMNS", "Metric",
]

PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
#: Per-response safety labels, True = safe (PRESA's y = +1).
CHOSEN_IS_SAFE = "chosen_is_safe"
REJECTED_IS_SAFE = "rejected_is_safe"
#: The annotator of a crowd preference (Safe-CPL's user).
USER_ID = "user_id"

PREFERENCE_COLUMNS = (PROMPT, CHOSEN, REJECTED)
SAFETY_LABEL_COLUMNS = (CHOSEN_IS_SAFE, REJECTED_IS_SAFE)


class Metric:
    """Logged metric names (``<group>/<name>``), the same in TRL logs and control JSONL logs."""

    LOSS = "loss"
    PREFERENCE_LOSS = "loss/preference"
    SAFETY_LOSS = "loss/safety"
    KL_LOSS = "loss/kl"
    BC_LOSS = "loss/bc"
    PROB_SAFE = "safety/prob_safe"
    PROB_UNSAFE = "safety/prob_unsafe"
    PROB_MEAN = "safety/prob_mean"
    FRAC_SAFE = "safety/frac_safe"
    REF_POINT = "safety/ref_point"
    NU = "lagrange/nu"
    CONSTRAINT = "lagrange/constraint"
    STEP_PROB_MEAN = "lagrange/step_prob_mean"
    REWARDS_CHOSEN = "rewards/chosen"
    REWARDS_REJECTED = "rewards/rejected"
    REWARDS_ACCURACY = "rewards/accuracies"
    REWARDS_MARGIN = "rewards/margins"
    LOGPS_CHOSEN = "logps/chosen"
    LOGPS_REJECTED = "logps/rejected"
    # TRL's own DPO metrics, kept by the trainer base under TRL's names.
    LOGITS_CHOSEN = "logits/chosen"
    LOGITS_REJECTED = "logits/rejected"
    ENTROPY = "entropy"
    MEAN_TOKEN_ACCURACY = "mean_token_accuracy"
    NUM_TOKENS = "num_tokens"
    AUX_LOSS = "aux_loss"
    KL_WEIGHT = "latent/kl_weight"
    LATENT_KL = "latent/kl"
    EVAL_REWARD = "eval/reward"
    EVAL_COST = "eval/cost"
    EVAL_NORMALIZED_REWARD = "eval/normalized_reward"
    EVAL_NORMALIZED_COST = "eval/normalized_cost"
