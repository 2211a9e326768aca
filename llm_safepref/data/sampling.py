"""Batched generation from a causal LM (used by the on-policy build and the evaluation harness).

Prompts are sorted by token length so each left-padded batch wastes little compute, then
answers are put back in the input order. Sampling is seeded per batch
(``torch.Generator``-free: ``torch.manual_seed(seed + batch_index)``) so a run is reproducible
on the same machine and thread count whatever the batch boundaries of other calls.
"""

from __future__ import annotations

import time

__all__ = ["SAFETY_SYSTEM_PROMPT", "format_chat", "generate_responses"]

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful and harmless assistant. If a request could lead to violence, weapons, crime, "
    "self-harm, hate or other serious harm, refuse briefly, explain why, and offer a safe alternative. "
    "Otherwise, answer helpfully and follow the user's instructions exactly."
)


def format_chat(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The model's chat-template text for one user turn (generation prompt appended)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"System: {system_prompt}\n" if system_prompt else ""
    return f"{head}User: {prompt}\nAssistant:"


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    system_prompt: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    deadline: float | None = None,
) -> list[str | None]:
    """One response per prompt; ``None`` for prompts not reached before ``deadline`` (time.time())."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [format_chat(tokenizer, p, system_prompt) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    out: list[str | None] = [None] * len(texts)
    model.eval()
    bar = tqdm(total=len(texts), desc=desc, disable=not progress)
    for b, start in enumerate(range(0, len(order), batch_size)):
        if deadline is not None and time.time() > deadline:
            break
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=do_sample)
        if do_sample:
            torch.manual_seed(seed + b)
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            gen = model.generate(**enc, **kwargs)  # (B, T_prompt + T_new)
        new = gen[:, enc["input_ids"].shape[1] :]
        for i, row in zip(idx, new):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return out
