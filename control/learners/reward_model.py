"""One Bradley–Terry reward model on the crowd's pooled preferences: RC's shared artefact.

Design decisions:

- Data: the crowd's preferences (``control.feedback.make_crowd_feedback`` with
  ``default_crowd_config(task)``'s segment and set sizes unless set), every user's labels
  pooled, user ids ignored: RC assumes one reward for everyone (Lin & Brown's RC baseline).
  Query sets are split 90/10 into training and held-out sets (the authors' split).
- Model ``r_hat(s, a)``: an MLP on ``[(s - m) / sd, a]``; a segment's reward is
  ``sum_t r_hat(s_t, a_t)`` (B,) and the loss is the core's ``bradley_terry_loss`` on the
  (chosen, rejected) sums: ``-log sigmoid(R(chosen) - R(rejected))``.
- Trained by the common resumable loop (``control.learners.base.run_learner``), once per
  (task, seed) in a suite and shared by the three RC weights. The artefact is
  ``reward_per_row.npy`` (N,) float32, ``r_hat`` of every dataset row, plus
  ``reward_model.json`` (config, held-out accuracy, the data it saw); RC reads only those.
  :attr:`RewardModelLearner.output_files` names them, so the suite knows a finished artefact.
- Preference imbalance (``user_weights``): how often each user labels a query set
  (``CrowdFeedbackConfig.user_weights``). The suite's ``reward_model_imbalanced`` artefact
  uses :func:`imbalanced_user_weights`: user 0 labels ``IMBALANCE_WEIGHT`` = 4 times as many
  sets as each other user (the authors' 4,000 vs 1,000 of their language proof of concept),
  the one setting of every ``_imbalanced`` arm (RC(0.5), Safe-CPL, Safe-VPL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from control.data import Dataset
from control.feedback import default_crowd_config, gather_segments, make_crowd_feedback
from control.learners.base import Learner, LearnerConfig, dataset_obs_stats
from control.policies import mlp
from control.tasks import get_spec
from llm_safepref.core.losses import bradley_terry_loss
from llm_safepref.core.provenance import write_json
from llm_safepref.core.schema import CHOSEN, REJECTED, USER_ID, Metric

__all__ = ["RewardModelConfig", "RewardNet", "RewardModelLearner", "config_for", "ARTEFACT_FILE", "META_FILE",
           "load_reward_artefact", "IMBALANCE_WEIGHT", "imbalanced_user_weights"]

ARTEFACT_FILE = "reward_per_row.npy"
META_FILE = "reward_model.json"
#: The imbalance arms' majority: user 0 labels this many times as many query sets as each other user.
IMBALANCE_WEIGHT = 4.0


def imbalanced_user_weights(task: str) -> list[float]:
    """``[IMBALANCE_WEIGHT, 1, ..., 1]`` over the task's users: the one imbalance setting of the suite."""
    return [IMBALANCE_WEIGHT] + [1.0] * (get_spec(task).n_users - 1)


@dataclass
class RewardModelConfig(LearnerConfig):
    """The crowd feedback the reward model learns from and the held-out split."""

    n_query_sets: int = field(default=5000, metadata={"help": "Crowd query sets (one labelling user each)."})
    set_size: int | None = field(default=None, metadata={"help": "Pairs per query set; None = the task's default "
                                                                 "(16; Reach 32)."})
    segment_length: int | None = field(default=None, metadata={"help": "Steps per segment; None = the task's "
                                                                        "default (64; Reach 16)."})
    label_noise: float = field(default=0.0, metadata={"help": "Flip probability of the crowd's labels."})
    feedback_beta: float | None = field(default=None, metadata={"help": "Boltzmann rationality of the crowd; None = "
                                                                        "argmax labels."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Fraction of query sets held out for accuracy."})
    user_weights: list[float] | None = field(default=None, metadata={"help": "Relative frequency of each user "
                                                                             "(preference imbalance); None = "
                                                                             "uniform."})

    def __post_init__(self):
        super().__post_init__()
        if self.user_weights is not None:
            self.user_weights = [float(w) for w in self.user_weights]
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


def config_for(task: str, scale: str, **kw) -> RewardModelConfig:
    if scale == "smoke":
        base = dict(steps=40, batch_size=16, hidden=32, n_query_sets=20, set_size=4, segment_length=16,
                    log_every=5, checkpoint_every=10)
    elif scale == "small":
        base = dict(steps=1_000, batch_size=64, hidden=256, n_query_sets=2_000, log_every=50,
                    checkpoint_every=500)
    elif scale == "paper":
        base = dict(steps=50_000, batch_size=96, hidden=256, n_query_sets=5_000, log_every=500,
                    checkpoint_every=5_000)
    else:
        raise ValueError(f"unknown scale {scale!r}; valid scales: smoke, small, paper")
    base.update(kw)
    return RewardModelConfig(**base)


class RewardNet(nn.Module):
    """``r_hat(s, a)`` (..., obs_dim), (..., A) -> (...)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, obs_mean, obs_std):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden, layers)
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([(obs - self.obs_mean) / self.obs_std, act], -1)).squeeze(-1)


class RewardModelLearner(Learner):
    method = "reward_model"
    #: What :meth:`finalize` writes into the artefact folder (the suite checks them all).
    output_files = (ARTEFACT_FILE, META_FILE)

    def __init__(self, config: RewardModelConfig, ds: Dataset, seed: int):
        super().__init__(config, ds, seed)
        over = {k: v for k, v in (("set_size", config.set_size), ("segment_length", config.segment_length))
                if v is not None}
        self.crowd_config = default_crowd_config(ds.spec.name, n_query_sets=config.n_query_sets,
                                                 label_noise=config.label_noise, beta=config.feedback_beta,
                                                 user_weights=None if config.user_weights is None
                                                 else tuple(config.user_weights), seed=seed, **over)
        self.feedback = make_crowd_feedback(ds, self.crowd_config)
        n_sets = self.crowd_config.n_query_sets
        held = np.random.default_rng(seed + 1).permutation(n_sets)[: max(1, int(round(config.heldout_fraction * n_sets)))]
        is_held = np.isin(self.feedback["query_set_id"], held)
        self.train_pairs, self.heldout_pairs = np.flatnonzero(~is_held), np.flatnonzero(is_held)
        if len(self.train_pairs) == 0:
            raise ValueError(f"{n_sets} query sets leave none for training after holding out {len(held)}")
        mean, std = dataset_obs_stats(ds)
        self.net = RewardNet(ds["observations"].shape[1], ds["actions"].shape[1], config.hidden, config.layers,
                             mean, std)
        self.modules = {"reward": self.net}
        self.optimizers = {"reward": torch.optim.Adam(self.net.parameters(), lr=config.lr)}

    @property
    def segment_length(self) -> int:
        return self.crowd_config.segment_length

    def can_validate(self, step: int) -> bool:
        return False  # a reward model has no policy to roll out

    def segment_rewards(self, starts: np.ndarray) -> torch.Tensor:
        """(B,) ``sum_t r_hat(s_t, a_t)`` over the segments starting at ``starts``."""
        seg = gather_segments(self.ds, starts, self.segment_length)
        obs = torch.as_tensor(seg["observations"], dtype=torch.float32)
        act = torch.as_tensor(seg["actions"], dtype=torch.float32)
        return self.net(obs, act).sum(-1)

    def pair_terms(self, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r_c = self.segment_rewards(self.feedback[CHOSEN][pairs])
        r_r = self.segment_rewards(self.feedback[REJECTED][pairs])
        return bradley_terry_loss(r_c, r_r), (r_c > r_r).float()

    def train_step(self, step: int) -> dict[str, float]:
        pairs = self.train_pairs[self.rng.integers(len(self.train_pairs), size=self.config.batch_size)]
        losses, correct = self.pair_terms(pairs)
        loss = losses.mean()
        opt = self.optimizers["reward"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {Metric.LOSS: loss.item(), Metric.PREFERENCE_LOSS: loss.item(),
                Metric.REWARDS_ACCURACY: correct.mean().item()}

    @torch.no_grad()
    def finalize(self, out_dir: str | Path) -> dict:
        """Write the artefact (per-row rewards and its JSON); returns the JSON's content."""
        out_dir = Path(out_dir)
        self.net.eval()
        losses, correct = self.pair_terms(self.heldout_pairs) if len(self.heldout_pairs) else (None, None)
        per_row = np.concatenate([
            self.net(torch.as_tensor(self.ds["observations"][i:i + 65_536], dtype=torch.float32),
                     torch.as_tensor(self.ds["actions"][i:i + 65_536], dtype=torch.float32)).numpy()
            for i in range(0, self.ds.n, 65_536)]).astype(np.float32)
        tmp = out_dir / (ARTEFACT_FILE + ".tmp.npy")
        np.save(tmp, per_row)
        tmp.replace(out_dir / ARTEFACT_FILE)
        users = np.bincount(self.feedback[USER_ID][:: self.crowd_config.set_size], minlength=self.spec.n_users)
        meta = {"kind": "reward_model", "task": self.spec.name, "seed": self.seed, "n_rows": int(self.ds.n),
                "crowd_config": {**{k: getattr(self.crowd_config, k) for k in
                                    ("n_query_sets", "set_size", "segment_length", "penalty", "beta",
                                     "label_noise")},
                                 "user_weights": None if self.crowd_config.user_weights is None
                                 else list(self.crowd_config.user_weights)},
                "sets_per_user": users.tolist(),
                "n_train_pairs": int(len(self.train_pairs)), "n_heldout_pairs": int(len(self.heldout_pairs)),
                "heldout_accuracy": None if correct is None else float(correct.mean()),
                "heldout_loss": None if losses is None else float(losses.mean())}
        write_json(out_dir / META_FILE, meta)
        return meta


def load_reward_artefact(folder: str | Path, n_rows: int) -> tuple[np.ndarray, dict]:
    """(N,) per-row ``r_hat`` and its JSON from a reward-model folder; checks it matches the dataset."""
    folder = Path(folder)
    path, meta_path = folder / ARTEFACT_FILE, folder / META_FILE
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"no reward-model artefact in {folder} ({ARTEFACT_FILE} and {META_FILE}); RC needs "
                                "its reward model trained first (the suite runs it before the RC runs)")
    meta = json.loads(meta_path.read_text())
    r = np.load(path)
    if r.shape != (n_rows,):
        raise ValueError(f"{path}: {r.shape[0]} rows of r_hat for a dataset of {n_rows} rows")
    return r, meta
