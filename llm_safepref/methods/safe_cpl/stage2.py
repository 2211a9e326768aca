"""Safe-CPL stage 2: serve a new, safety-agnostic task by choosing z, with the LM frozen.

The stage-1 policy ``π(y | x, z)`` is fixed. A new task brings only a reward ``r(x, y)`` (a
Python callable on prompt and response, :func:`resolve_task_reward`) that knows nothing about
safety. Every z of the prior is a crowd skill and every crowd skill is safe, so the task is
served by *choosing z* (Safe-CPL, Lin & Brown 2026, stage 2; ``docs/methods.md``), kept near
the prior by a penalty on the standardised latent ``ε``:

    z = μ_prior + σ_prior ⊙ ε,       score(x, y, ε) = r(x, y) − w · ‖ε‖²

Two ways to choose ε per prompt, each with the same number ``K`` of generations per prompt as
every baseline:

* **search** (:func:`search_epsilons`): ``K`` draws ``ε_k ~ N(0, I)``, one generation each,
  keep the best ``score``;
* **amortised** (:class:`AmortizedLatentPolicy`): a high-level policy ``π_hi(ε | x) =
  N(m(e(x)), s² I)`` over a frozen prompt embedding ``e(x)``, ``m = 3 tanh(MLP)`` so that
  ``ε ∈ [−3, 3]^d`` as in the authors' control code. It is fitted on *training* prompts by
  advantage-weighted regression (Peng et al. 2019) on ``K`` draws per prompt scored with the
  same penalised task reward: ``max Σ_k softmax_k(score/τ) log π_hi(ε_k | x)``; rounds repeat
  with draws from the current policy. At test time ``K`` draws from ``π_hi(· | x)``, the
  best ``score`` kept.

Design decisions:

* Draws are seeded per prompt (``(seed, prompt id)`` hashed), not from a global stream, so
  a prompt's ε are the same in any subset, order or batch size.
* ``w`` is in units of the task reward: the crowd's goals score in [0, 1] and ``E‖ε‖² = d``,
  so the default ``w = 0.05`` lets ``‖ε‖²`` of a typical 4-d draw (≈ 4 ± 3) move a score by
  ±0.15; the control world's ``w = 1`` is in units of episode returns (tens to hundreds).
* Generation is sampled (temperature, top-p) with a seed per batch, the same settings as the
  base model's best-of-K samples, so methods differ only in how they choose.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "TaskReward",
    "resolve_task_reward",
    "prompt_generator",
    "search_epsilons",
    "compose_z",
    "penalised_scores",
    "users_gaussian",
    "AmortizedLatentPolicy",
    "generate_with_latents",
    "EPS_BOUND",
]

#: The box ε lives in (the authors' high-level policy acts in [−3, 3]^d).
EPS_BOUND = 3.0


@dataclass(frozen=True)
class TaskReward:
    """A safety-agnostic task reward ``r(prompt, response) -> float`` with a name for the tables."""

    name: str
    function: Callable[[str, str], float]
    description: str = ""

    def __call__(self, prompt, response) -> float:
        return float(self.function(_text(prompt), _text(response)))

    def many(self, prompts: Sequence, responses: Sequence) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"task reward: {len(prompts)} prompts for {len(responses)} responses")
        return np.asarray([self(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


def _text(value) -> str:
    if isinstance(value, list):  # a message list: the last message's content
        return str(value[-1].get("content", "")) if value else ""
    return "" if value is None else str(value)


def resolve_task_reward(spec: str | Callable | TaskReward = "embedded") -> TaskReward:
    """The downstream task's reward.

    ``"embedded"``: the crowd benchmark's downstream goal (``downstream_concise_you``, a short
    answer written to the reader; no crowd user has it, its parts are crowd skills); a
    simulated user's id (``python -m llm_safepref.crowd users``): that user's goal score of the
    response (no refusal or safety term: the reward is safety-agnostic); ``"module:function"``:
    any callable ``(prompt, response) -> float``; or a callable / :class:`TaskReward`.
    """
    if isinstance(spec, TaskReward):
        return spec
    if callable(spec):
        return TaskReward(getattr(spec, "__name__", "task_reward"), spec)
    name = str(spec)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"task reward {name!r}: cannot import module {module_name!r} ({err})") from err
        function = getattr(module, attr, None)
        if not callable(function):
            raise ValueError(f"task reward {name!r}: {module_name} has no callable {attr!r}")
        return TaskReward(name, function, f"{name} (a user callable)")
    from llm_safepref.crowd.users import DOWNSTREAM, get_user

    try:
        user = DOWNSTREAM if name == "embedded" else get_user(name)
    except KeyError as err:
        raise ValueError(f"task reward {name!r}: not 'embedded', a simulated user id or 'module:function' ({err})") \
            from None
    goal = user.goal
    return TaskReward(user.user_id, lambda prompt, response: goal.score(response), goal.describe())


# ----------------------------------------------------------------------------- ε draws


def prompt_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, key)`` alone (64 bits of SHA-256)."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def search_epsilons(prompt_ids: Sequence[str], k: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """``(N, K, d)``: ``K`` standard-normal draws per prompt, seeded per ``(seed, prompt id)``."""
    if k < 1:
        raise ValueError(f"need at least one draw per prompt, got K={k}")
    return torch.stack([torch.randn(k, dim, generator=prompt_generator(seed, f"search/{pid}"))
                        for pid in prompt_ids]) if prompt_ids else torch.zeros(0, k, dim)


def compose_z(eps: torch.Tensor, prior_mu: torch.Tensor, prior_sigma: torch.Tensor) -> torch.Tensor:
    """``z = μ_prior + σ_prior ⊙ ε`` for ε of any leading shape ``(..., d)``."""
    return prior_mu.to(eps) + prior_sigma.to(eps) * eps


def users_gaussian(users: dict[str, Sequence[float]], *, floor: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, sigma)`` per dimension of the training users' posterior means (sample std, at least ``floor``).

    The aggregate-posterior alternative to the learned prior: with a small KL weight the learned
    prior can stay near N(0, I) while the users' z sit elsewhere, so prior draws land on no user's skill.
    """
    if len(users) < 2:
        raise ValueError(f"need at least 2 users' posterior means, got {len(users)}")
    z = torch.tensor([list(v) for _, v in sorted(users.items())], dtype=torch.float32)  # (U, d)
    return z.mean(0), z.std(0, unbiased=True).clamp_min(floor)


def penalised_scores(rewards: np.ndarray, eps: torch.Tensor | np.ndarray, penalty: float) -> np.ndarray:
    """``r − w ‖ε‖²`` elementwise over ``(N, K)`` rewards and ``(N, K, d)`` ε."""
    sq = (torch.as_tensor(eps, dtype=torch.float64) ** 2).sum(-1).numpy()
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != sq.shape:
        raise ValueError(f"rewards {rewards.shape} and ε {tuple(sq.shape)} + (d,) do not match")
    return rewards - float(penalty) * sq


# ----------------------------------------------------------------------------- the amortised policy


class AmortizedLatentPolicy(nn.Module):
    """``π_hi(ε | x) = N(m(e(x)), s² I)``, ``m = 3 tanh(MLP(standardise(e(x))))``.

    ``e(x)``: a frozen prompt embedding ``(N, E)`` (the stage-1 context embedder's, cached).
    The mean starts at 0 (the prior) because the last layer starts at zero.
    """

    def __init__(self, embed_dim: int, latent_dim: int, hidden_dim: int = 64, std: float = 0.5):
        super().__init__()
        self.latent_dim, self.std = int(latent_dim), float(std)
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, latent_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("feat_mean", torch.zeros(embed_dim))
        self.register_buffer("feat_std", torch.ones(embed_dim))

    def set_standardisation(self, features: torch.Tensor) -> None:
        self.feat_mean.copy_(features.mean(0))
        self.feat_std.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.feat_std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, E) -> (N, d)``: the mean ε."""
        x = (features.float() - self.feat_mean) / self.feat_std
        return EPS_BOUND * torch.tanh(self.net(x))

    def sample(self, features: torch.Tensor, prompt_ids: Sequence[str], k: int, *, seed: int = 0,
               tag: str = "amortized") -> torch.Tensor:
        """``(N, K, d)``: ``K`` draws per prompt from ``π_hi``, clipped to the box, seeded per prompt."""
        with torch.no_grad():
            mean = self(features)
        noise = torch.stack([torch.randn(k, self.latent_dim, generator=prompt_generator(seed, f"{tag}/{pid}"))
                             for pid in prompt_ids])
        return (mean[:, None, :] + self.std * noise).clamp(-EPS_BOUND, EPS_BOUND)

    def fit(self, features: torch.Tensor, eps: torch.Tensor, scores: np.ndarray, *, temperature: float = 0.05,
            steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
        """Advantage-weighted regression on ``(N, E)`` features, ``(N, K, d)`` draws, ``(N, K)`` scores.

        Weights ``softmax_k(score / τ)`` per prompt; the loss is the weighted Gaussian NLL of
        the draws (fixed ``s``: a weighted least-squares fit of the mean). Returns diagnostics.
        """
        scores_t = torch.as_tensor(scores, dtype=torch.float32)
        weights = torch.softmax(scores_t / float(temperature), dim=1)  # (N, K)
        torch.manual_seed(seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        eps = eps.float()
        first = last = None
        for _ in range(int(steps)):
            mean = self(features)
            nll = ((mean[:, None, :] - eps) ** 2).sum(-1) / (2 * self.std ** 2)  # (N, K)
            loss = (weights * nll).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = float(loss.detach())
            first = last if first is None else first
        with torch.no_grad():
            mean = self(features)
        return {"awr_loss_first": first, "awr_loss_last": last,
                "mean_eps_norm": float(mean.norm(dim=-1).mean()),
                "weight_entropy": float(-(weights * weights.clamp_min(1e-12).log()).sum(1).mean())}


# ----------------------------------------------------------------------------- generation


def generate_with_latents(policy, prompts: Sequence, z: torch.Tensor, *, max_new_tokens: int = 64,
                          batch_size: int = 16, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                          do_sample: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """One completion per ``(prompt, z)`` row (``len(prompts) == len(z)``), batched, seeded per batch.

    Rows are sorted by prompt length (less padding) and the outputs put back in order; the
    seed of a batch is ``seed + batch index``, so the result depends on ``batch_size``. Decoding
    runs with the LoRA deltas merged (:meth:`SafeCPLPolicy.merged_adapter`; the base weights are
    restored exactly afterwards).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if len(prompts) != len(z):
        raise ValueError(f"{len(prompts)} prompts for {len(z)} latents")
    lengths = [len(policy._prompt_ids(p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    out: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    policy.model.eval()
    with policy.merged_adapter():
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            texts = policy.generate([prompts[i] for i in idx], z=z[idx], max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed + b)
            for i, text in zip(idx, texts):
                out[i] = text.strip()
            bar.update(len(idx))
    bar.close()
    return out
