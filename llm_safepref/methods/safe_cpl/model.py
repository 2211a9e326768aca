"""The latent-user conditioner of Safe-CPL: context set -> q(z) -> z -> soft prompt.

``LatentConditioner`` holds VPL's pair-set encoder, the prior and a projection of ``z`` to
``P`` soft-prompt vectors that are prepended to the policy's input embeddings.

Design decisions:

* One ``nn.Module`` with three parts, all from or on :mod:`llm_safepref.core.latent`:
  :class:`~llm_safepref.core.latent.PairSetEncoder` (``q(z | context) = N(mu, diag(exp(logvar)))``
  over ``(B, K, D)`` pair features and a ``(B, K)`` mask), :class:`~llm_safepref.core.latent.GaussianPrior`
  and the projection ``Linear(d, h) -> tanh -> Linear(h, P * H)`` (``H`` the LM's hidden size).
  Pair features are standardised per dimension by buffers (``feature_mean`` / ``feature_std``)
  computed once on the training pool: the last-token states of an LM share a large common
  component that would otherwise swamp the chosen/rejected difference. The buffers travel
  with the weights, so inference standardises exactly as training did.
* It is registered ON the policy (attribute :data:`CONDITIONER_NAME` of the transformers
  model) before PEFT wraps it, and named in the LoRA config's ``modules_to_save``. PEFT then
  keeps a trainable copy (``ModulesToSaveWrapper``), excludes it from LoRA targeting (also
  under ``target_modules="all-linear"``), and saves / loads it inside ``adapter_model.safetensors``:
  the conditioner is in the optimiser, in DDP (it is a submodule of the wrapped model), in
  every checkpoint and in a resume, with no extra file. :func:`conditioner_of` returns the
  module that is active (the trained copy).
* The soft prompt's bias starts at the embeddings of ``P`` vocabulary tokens (seeded), as
  P-DPO starts its user tokens from real embeddings; the projection weights start at the
  embeddings' scale, so that ``z`` changes the prompt from the first step.
* Noise: :func:`example_noise_seed` maps ``(seed, example index, step)`` to a 63-bit seed and
  :func:`example_noise` draws each example's ``eps ~ N(0, I_d)`` from its own ``torch.Generator``
  on the CPU. An example's noise therefore depends on nothing but those three numbers: not on
  the batch it lands in, the number of processes, the device, or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from llm_safepref.core.latent import GaussianPrior, PairSetEncoder, gaussian_kl, reparameterize

__all__ = [
    "CONDITIONER_NAME",
    "ConditionerConfig",
    "LatentConditioner",
    "attach_conditioner",
    "conditioner_of",
    "example_noise",
    "example_noise_seed",
    "extend_for_soft_prompt",
    "soft_prompt_embeds",
]

#: Attribute of the transformers model that holds the conditioner (and its ``modules_to_save`` name).
CONDITIONER_NAME = "safe_cpl_conditioner"


@dataclass(frozen=True)
class ConditionerConfig:
    """Shapes of a :class:`LatentConditioner` (stored in the artefact's ``safe_cpl.json``)."""

    pair_dim: int  # D: features per context pair
    latent_dim: int  # d
    n_soft_tokens: int  # P
    hidden_size: int  # H: the LM's embedding size
    encoder_hidden_size: int = 256
    encoder_num_heads: int = 4
    projection_hidden_size: int = 256
    prior_learned: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConditionerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown conditioner config keys {unknown}; expected {sorted(known)}")
        return cls(**data)


class LatentConditioner(nn.Module):
    """``features (B, K, D), mask (B, K) -> soft prompt (B, P, H), mu, logvar, z (B, d)``."""

    def __init__(self, config: ConditionerConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = PairSetEncoder(c.pair_dim, c.latent_dim, c.encoder_hidden_size, num_heads=c.encoder_num_heads)
        self.prior = GaussianPrior(c.latent_dim, learned=c.prior_learned)
        self.projection = nn.Sequential(
            nn.Linear(c.latent_dim, c.projection_hidden_size),
            nn.Tanh(),
            nn.Linear(c.projection_hidden_size, c.n_soft_tokens * c.hidden_size),
        )
        self.register_buffer("feature_mean", torch.zeros(c.pair_dim))
        self.register_buffer("feature_std", torch.ones(c.pair_dim))
        #: Set by the trainer (``freeze_encoder``): encoder and prior run without gradients.
        self.frozen_encoder = False

    # ------------------------------------------------------------------ set-up

    @torch.no_grad()
    def init_soft_prompt(self, embedding_weight: torch.Tensor, seed: int = 0) -> None:
        """Start the soft prompt at ``P`` real token embeddings (seeded) and the projection at their scale."""
        c = self.config
        if embedding_weight.shape[1] != c.hidden_size:
            raise ValueError(f"embedding matrix of width {embedding_weight.shape[1]} does not match the conditioner's "
                             f"hidden_size={c.hidden_size}")
        weight = embedding_weight.detach().float().cpu()
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, weight.shape[0], (c.n_soft_tokens,), generator=g)
        last = self.projection[-1]
        last.bias.copy_(weight[tokens].reshape(-1).to(last.bias))
        std = float(weight.std())
        last.weight.copy_((torch.randn(last.weight.shape, generator=g) * std / c.projection_hidden_size**0.5)
                          .to(last.weight))

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension standardisation of the pair features, ``(D,)`` each (std floored at 1e-6)."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature stats of shapes {tuple(mean.shape)} / {tuple(std.shape)} do not match "
                             f"pair_dim={self.config.pair_dim}")
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.clamp(min=1e-6).to(self.feature_std))

    # ------------------------------------------------------------------ parts

    def encode(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | context)``: ``(mu, logvar)``, ``(B, d)`` each, from ``(B, K, D)`` features."""
        x = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        if self.frozen_encoder:
            with torch.no_grad():
                return self.encoder(x, mask)
        return self.encoder(x, mask)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL(q || p)`` per example, ``(B,)`` (the prior held fixed with a frozen encoder)."""
        if self.frozen_encoder:
            return gaussian_kl(mu, logvar, self.prior.mean.detach(), self.prior.logvar.detach())
        return self.prior.kl(mu, logvar)

    def soft_prompt(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, P, H)``."""
        if z.dim() != 2 or z.size(1) != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        out = self.projection(z.to(self.feature_mean))
        return out.view(z.size(0), self.config.n_soft_tokens, self.config.hidden_size)

    def prior_mean(self) -> torch.Tensor:
        """The prior's mean ``(d,)``: the z used when nothing is known about the user."""
        return self.prior.mean.detach().clone()

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(soft prompt (B, P, H), mu, logvar, z)``; ``z = mu + sigma * noise`` (``z = mu`` without noise)."""
        mu, logvar = self.encode(features, mask)
        if noise is None:
            z = mu
        else:
            z = reparameterize(mu, logvar, noise=noise.to(mu))
        return self.soft_prompt(z), mu, logvar, z


# ---------------------------------------------------------------------- on the policy


def attach_conditioner(model: nn.Module, conditioner: LatentConditioner) -> None:
    """Register ``conditioner`` on a transformers model (before PEFT wraps it) as :data:`CONDITIONER_NAME`."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        raise ValueError("attach the conditioner to the base model before PEFT wraps it (pass the base model and a "
                         "peft_config to SafeCPLTrainer)")
    if hasattr(model, CONDITIONER_NAME):
        raise ValueError(f"the model already holds a {CONDITIONER_NAME!r} submodule")
    param = next(model.parameters(), None)
    if param is not None:
        conditioner.to(param.device)
    model.add_module(CONDITIONER_NAME, conditioner)


def conditioner_of(model: nn.Module) -> LatentConditioner:
    """The active :class:`LatentConditioner` of a policy (DDP / PEFT wrappers looked through).

    Under PEFT it is the trained copy in ``modules_to_save`` (the wrapper's ``original_module``
    is the untrained one the adapter-off reference would see; the reference never calls it).
    """
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    wrapped = getattr(base, CONDITIONER_NAME, None)
    if wrapped is None:
        raise ValueError(f"the model has no {CONDITIONER_NAME!r}: it is not a Safe-CPL policy")
    if isinstance(wrapped, LatentConditioner):
        return wrapped
    copies = getattr(wrapped, "modules_to_save", None)
    active = getattr(wrapped, "active_adapters", None) or []
    if copies is not None and active and active[0] in copies:
        return copies[active[0]]
    raise ValueError(f"{CONDITIONER_NAME!r} is wrapped by {type(wrapped).__name__} with no active trained copy")


def extend_for_soft_prompt(model_kwargs: dict, p: int) -> dict:
    """``attention_mask`` with ``p`` ones in front and ``labels`` (when present) with ``p`` times ``-100``.

    The ``p`` positions the soft prompt will occupy are attended to but never scored (the base
    sums the last ``T - 1`` per-token log-probs only).
    """
    input_ids = model_kwargs["input_ids"]
    n = input_ids.size(0)
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    model_kwargs["attention_mask"] = torch.cat([mask.new_ones(n, p), mask], dim=1)
    if model_kwargs.get("labels") is not None:
        labels = model_kwargs["labels"]
        model_kwargs["labels"] = torch.cat([labels.new_full((n, p), -100), labels], dim=1)
    return model_kwargs


def soft_prompt_embeds(soft: torch.Tensor, input_ids: torch.Tensor, embed: nn.Module) -> torch.Tensor:
    """``(N, P + T, H)``: the soft prompt ``(N, P, H)`` followed by the token embeddings of ``input_ids``."""
    embeds = embed(input_ids)  # (N, T, H)
    if soft.size(0) != embeds.size(0):
        raise ValueError(f"soft prompt for {soft.size(0)} rows, batch has {embeds.size(0)}")
    return torch.cat([soft.to(embeds.dtype), embeds], dim=1)


# ---------------------------------------------------------------------- per-example noise


def example_noise_seed(seed: int, example_index: int, step: int) -> int:
    """A 63-bit seed from ``(run seed, example index, optimiser step)`` (BLAKE2b of the three)."""
    key = f"safe-cpl-noise\x00{int(seed)}\x00{int(example_index)}\x00{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def example_noise(seed: int, example_indices, step: int, dim: int) -> torch.Tensor:
    """``(B, dim)`` float32 standard-normal noise on the CPU, row ``b`` drawn from its own
    generator seeded by :func:`example_noise_seed` ``(seed, example_indices[b], step)``."""
    rows = []
    for index in example_indices:
        g = torch.Generator().manual_seed(example_noise_seed(seed, int(index), step))
        rows.append(torch.randn(dim, generator=g))
    if not rows:
        return torch.zeros(0, dim)
    return torch.stack(rows)
