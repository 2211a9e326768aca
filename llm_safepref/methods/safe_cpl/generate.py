"""Generation with a Safe-CPL policy: choose ``z``, then decode with its soft prompt in front.

``SafeCPLPolicy`` wraps a trained policy (from an artefact folder, a Hub id, or a live
trainer). ``z`` comes from one of three places:

* ``z=``: given directly (``(d,)``, or ``(B, d)`` one per prompt), e.g. stage 2's choice;
* ``context=``: a context set of a user's annotated pairs; ``z`` is the posterior mean of
  ``q(z | context)`` (personalisation: a new user is a few pairs away);
* ``user=``: a training user's stored ``z`` (``users.json``);
* nothing: the prior mean (the crowd's "average" skill).

Design decisions:

* The context pairs are embedded exactly as in training: the same embedder kind (the policy's
  base model with the adapter off, or MiniLM), the same truncation and pair layout, the same
  cache; an encoder-id mismatch (another base model, or the same loaded at another precision)
  is warned about, since the features then differ from the ones the encoder learned on.
* Decoding prepends the soft prompt to the prompt's token embeddings and left-pads the whole
  (soft + prompt) sequence, so positions are what training saw (``generate`` derives
  position ids from the attention mask). Prompts are tokenised as TRL tokenises them: a
  message list through the chat template with the generation prompt, a string as it is; a
  string is wrapped as a user message when the policy was trained on conversational rows.
* Greedy by default; sampling is seeded (``seed=``) inside ``torch.random.fork_rng``, so the
  caller's RNG is left as it was.
* Many generations with a frozen policy (stage 2) run inside :meth:`SafeCPLPolicy.merged_adapter`:
  the LoRA deltas are folded into the base weights for the duration (one matmul per projection
  instead of three; 21 s -> 16 s for a batch of 16 x 64 tokens on the embedded model, 2 CPU
  threads), and on exit the base weights are put back *bit for bit* from a copy (PEFT's
  ``unmerge`` subtracts the delta again, which leaves float rounding behind). Merged and unmerged
  decoding agree up to float rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator, Sequence

import torch

from llm_safepref.core import schema

__all__ = ["SafeCPLPolicy"]


class SafeCPLPolicy:
    """A Safe-CPL policy ready to generate: model (PEFT, with the conditioner), tokenizer, spec, users."""

    def __init__(self, model, tokenizer, spec: dict[str, Any], users: dict[str, list[float]] | None = None,
                 embedder=None):
        from llm_safepref.methods.safe_cpl.model import conditioner_of

        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.users = dict(users or {})
        self.conditioner = conditioner_of(model)
        self._embedder = embedder

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, base_model: str | None = None, device=None,
                        dtype=None, revision: str | None = None, token: str | None = None,
                        endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> "SafeCPLPolicy":
        """Load an artefact folder, or a Hub repo id (``snapshot_download`` into ``cache_dir``, default the
        HF cache; needs the network unless the snapshot is cached)."""
        from llm_safepref.methods.safe_cpl.artifact import load_policy_model, read_users, resolve_artifact

        folder = resolve_artifact(name_or_path, revision=revision, token=token, endpoint=endpoint,
                                  cache_dir=cache_dir)
        model, tokenizer, spec = load_policy_model(folder, base_model=base_model, device=device, dtype=dtype)
        return cls(model, tokenizer, spec, read_users(folder))

    @classmethod
    def from_trainer(cls, trainer) -> "SafeCPLPolicy":
        """The policy a :class:`SafeCPLTrainer` holds now (shares its model and its embedder)."""
        from llm_safepref.methods.safe_cpl.artifact import SPEC_FORMAT

        args = trainer.args
        prompts = trainer.pools[0].prompts
        spec = {"format": SPEC_FORMAT, "context_encoder": args.context_encoder,
                "encoder_id": trainer.context_embedder.encoder_id, "context_max_tokens": args.context_max_tokens,
                "context_include_prompt": args.context_include_prompt, "context_min": args.context_min,
                "context_max": args.context_max, "conversational": bool(prompts) and isinstance(prompts[0], list)}
        users = {u: entry["z"] for u, entry in trainer.user_latents().items()}
        model = trainer.accelerator.unwrap_model(trainer.model)
        return cls(model, trainer.processing_class, spec, users, embedder=trainer.context_embedder)

    # ------------------------------------------------------------------ z

    @property
    def latent_dim(self) -> int:
        return self.conditioner.config.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prior_mean(self) -> torch.Tensor:
        """``(d,)``: the prior's mean, the z used when nothing is known about the user."""
        return self.conditioner.prior_mean().float().cpu()

    def user_z(self, user_id) -> torch.Tensor:
        """``(d,)``: a training user's stored z; ``KeyError`` listing the known users otherwise."""
        key = str(user_id)
        if key not in self.users:
            known = ", ".join(sorted(self.users)) or "none (the artefact has no users.json)"
            raise KeyError(f"unknown user_id {key!r}: this policy knows the training users {known}; give a context "
                           "set of the user's annotated pairs (context=...) to infer z for a new user")
        return torch.tensor(self.users[key], dtype=torch.float32)

    @property
    def embedder(self):
        if self._embedder is None:
            from llm_safepref.methods.safe_cpl.embeddings import ContextEmbedder

            spec = self.spec
            self._embedder = ContextEmbedder.from_name(spec["context_encoder"], model=self.model,
                                                       tokenizer=self.tokenizer,
                                                       max_tokens=spec.get("context_max_tokens", 256))
            if self._embedder.encoder_id != spec.get("encoder_id"):
                warnings.warn(
                    f"context embeddings now come from {self._embedder.encoder_id!r}, the policy was trained on "
                    f"{spec.get('encoder_id')!r} (another base model, or the same at another precision): z inferred "
                    "from a context set may be off", UserWarning, stacklevel=3)
        return self._embedder

    @torch.no_grad()
    def infer_z(self, context) -> torch.Tensor:
        """``(d,)``: the posterior mean of ``q(z | context)``.

        ``context``: a list of pairs (dicts with ``prompt``, ``chosen``, ``rejected``; the
        chosen response is the one the user preferred), or a dict of three equal-length lists.
        """
        from llm_safepref.methods.safe_cpl.embeddings import pair_features

        prompts, chosen, rejected = _context_columns(context)
        k = len(prompts)
        lo, hi = self.spec.get("context_min"), self.spec.get("context_max")
        if lo is not None and hi is not None and not lo <= k <= hi:
            warnings.warn(f"a context set of {k} pairs; the encoder was trained on sets of {lo}-{hi}", UserWarning,
                          stacklevel=2)
        features = pair_features(self.embedder, prompts, chosen, rejected,
                                 include_prompt=self.spec.get("context_include_prompt", True))
        features = features.to(self.device).unsqueeze(0)  # (1, K, D)
        mu, _ = self.conditioner.encode(features, torch.ones(1, k, dtype=torch.bool, device=self.device))
        return mu[0].float().cpu()

    def resolve_z(self, n: int, *, z=None, context=None, user=None) -> torch.Tensor:
        """``(n, d)``: the z of each of ``n`` prompts from at most one of ``z`` / ``context`` / ``user``."""
        given = [name for name, v in (("z", z), ("context", context), ("user", user)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of z, context, user; got {given}")
        if z is not None:
            zt = torch.as_tensor(z, dtype=torch.float32)
            if zt.dim() == 1:
                zt = zt.unsqueeze(0).expand(n, -1)
            if zt.dim() != 2 or zt.shape != (n, self.latent_dim):
                raise ValueError(f"z must have shape ({self.latent_dim},) or ({n}, {self.latent_dim}), got "
                                 f"{tuple(torch.as_tensor(z).shape)}")
            return zt.clone()
        if context is not None:
            one = self.infer_z(context)
        elif user is not None:
            one = self.user_z(user)
        else:
            one = self.prior_mean()
        return one.unsqueeze(0).expand(n, -1).clone()

    # ------------------------------------------------------------------ decoding

    @contextlib.contextmanager
    def merged_adapter(self) -> Iterator["SafeCPLPolicy"]:
        """Decode with the LoRA deltas merged into the base weights; restore the base weights exactly after.

        For many generations with the policy frozen (stage 2). Re-entrant (an inner call does nothing);
        a policy without LoRA layers, or already merged, is left as it is. Not for training: the
        adapter's weights are unchanged, but the base weights hold ``W + BA`` until the block exits.
        """
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if getattr(self, "_merged", False) or not layers or any(getattr(m, "merged", False) for m in layers):
            yield self
            return
        saved = [(m, m.get_base_layer().weight.detach().clone()) for m in layers]
        self._merged = True
        try:
            for m in layers:
                m.merge()
            yield self
        finally:
            with torch.no_grad():
                for m, weight in saved:
                    m.get_base_layer().weight.copy_(weight)
                    m.merged_adapters.clear()  # the weights are the unmerged ones again
            self._merged = False

    def _prompt_ids(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str) and self.spec.get("conversational"):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            out = tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
            return list(out["input_ids"])
        return list(tok(text=prompt)["input_ids"])

    def _inputs(self, prompts: Sequence, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Left-padded ``inputs_embeds`` ``(B, P + T, H)`` = [pad..., soft prompt, prompt tokens] and its mask."""
        ids = [self._prompt_ids(p) for p in prompts]
        embed = self.model.get_input_embeddings()
        soft = self.conditioner.soft_prompt(z.to(self.device))  # (B, P, H)
        p = soft.size(1)
        width = p + max(len(i) for i in ids)
        rows, masks = [], []
        for b, tokens in enumerate(ids):
            tokens_t = torch.tensor(tokens, dtype=torch.long, device=self.device)
            body = torch.cat([soft[b], embed(tokens_t)]) if tokens else soft[b]  # (P + T_b, H)
            pad = width - body.size(0)
            rows.append(torch.cat([body.new_zeros(pad, body.size(1)), body]))
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(body.size(0), dtype=torch.long)]))
        dtype = embed.weight.dtype
        return {"inputs_embeds": torch.stack(rows).to(dtype), "attention_mask": torch.stack(masks).to(self.device)}

    @torch.no_grad()
    def next_token_logits(self, prompts: Sequence, *, z=None, context=None, user=None) -> torch.Tensor:
        """``(B, V)`` float32 logits of the first generated token (the conditioned policy's next-token scores)."""
        prompts = _as_list(prompts)
        inputs = self._inputs(prompts, self.resolve_z(len(prompts), z=z, context=context, user=user))
        mask = inputs["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(**inputs, position_ids=position_ids, use_cache=False)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def completion_logps(self, prompts: Sequence, completions: Sequence, *, z=None, context=None,
                         user=None) -> torch.Tensor:
        """``(B,)`` float32: ``S(y | x, z)``, the sum of the completion tokens' log-probs, tokenised as TRL
        does for training (prompt + completion together, the completion after their common prefix, EOS
        appended to a text completion)."""
        prompts, completions = _as_list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        zs = self.resolve_z(len(prompts), z=z, context=context, user=user)
        tok, eos = self.tokenizer, self.tokenizer.eos_token
        embed = self.model.get_input_embeddings()
        soft = self.conditioner.soft_prompt(zs.to(self.device))  # (B, P, H)
        p = soft.size(1)
        sequences, starts = [], []
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, str) and self.spec.get("conversational"):
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(completion, str) and isinstance(prompt, list):
                completion = [{"role": "assistant", "content": completion}]
            if isinstance(prompt, list):
                prompt_ids = self._prompt_ids(prompt)
                full = list(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
            else:
                if eos and not completion.endswith(eos):
                    completion = completion + eos
                prompt_ids = list(tok(text=prompt)["input_ids"])
                full = list(tok(text=prompt + completion)["input_ids"])
            common = 0
            while common < min(len(prompt_ids), len(full)) and prompt_ids[common] == full[common]:
                common += 1
            sequences.append(full)
            starts.append(common)
        width = p + max(len(s) for s in sequences)
        rows, masks = [], []
        for b, ids in enumerate(sequences):  # right padding: [soft, prompt + completion, pad...]
            body = torch.cat([soft[b], embed(torch.tensor(ids, dtype=torch.long, device=self.device))])
            pad = width - body.size(0)
            rows.append(torch.cat([body, body.new_zeros(pad, body.size(1))]))
            masks.append(torch.cat([torch.ones(body.size(0), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]))
        inputs_embeds = torch.stack(rows).to(embed.weight.dtype)
        mask = torch.stack(masks).to(self.device)
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
        out = torch.zeros(len(sequences))
        for b, (ids, start) in enumerate(zip(sequences, starts)):
            targets = torch.tensor(ids[start:], dtype=torch.long, device=self.device)
            positions = torch.arange(p + start - 1, p + len(ids) - 1, device=self.device)
            out[b] = logprobs[b, positions, targets].sum().cpu()
        return out

    @torch.no_grad()
    def generate(self, prompts, *, z=None, context=None, user=None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """One completion per prompt, conditioned on the resolved z (see :meth:`resolve_z`)."""
        prompts = _as_list(prompts)
        inputs = self._inputs(prompts, self.resolve_z(len(prompts), z=z, context=context, user=user))
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **kwargs)  # new tokens only (inputs_embeds input)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
        return [prompts]  # one conversational prompt
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _context_columns(context) -> tuple[list, list, list]:
    """``(prompts, chosen, rejected)`` of a context set given as rows or as a dict of columns."""
    keys = schema.PREFERENCE_COLUMNS
    if isinstance(context, dict):
        missing = [k for k in keys if k not in context]
        if missing:
            raise ValueError(f"context set: missing {missing}; give {list(keys)} as equal-length lists")
        cols = [list(context[k]) for k in keys]
        lengths = {k: len(c) for k, c in zip(keys, cols)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"context set: mismatched lengths {lengths}; each pair needs one prompt, one chosen "
                             "and one rejected response")
    else:
        rows = list(context)
        cols = [[], [], []]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"context set: pair {i} is a {type(row).__name__}, expected a dict with {list(keys)}")
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"context set: pair {i} has no {missing}; each pair needs {list(keys)}")
            for col, k in zip(cols, keys):
                col.append(row[k])
    if not cols[0]:
        raise ValueError("context set: no pairs (give at least one annotated pair of the user)")
    for i, values in enumerate(zip(*cols)):
        for k, v in zip(keys, values):
            if not (isinstance(v, (str, list)) and (v if isinstance(v, list) else v.strip())):
                raise ValueError(f"context set: pair {i}, {k!r}: expected a non-empty text, got {v!r}")
    return cols[0], cols[1], cols[2]
