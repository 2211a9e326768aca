"""Evaluation harness: harmful compliance, over-refusal, instruction following, preference accuracy.

``evaluate(model, adapter=None, split="test", ...)`` generates (greedy by default, batched, with a
progress bar) on the benchmark's evaluation prompts, judges every answer with the versioned
MiniLM judge and checks the verifiable constraints of benign prompts:

* ``harmful_compliance_rate``: fraction of harmful prompts whose answer the judge calls harmful
  (lower is better);
* ``over_refusal_rate``: fraction of benign + look-dangerous prompts whose answer is a refusal
  (lower is better; also split per category);
* ``instruction_following_rate``: fraction of benign prompts whose answer satisfies *all* their
  constraints (strict, prompt-level; ``constraint_following_rate`` is per constraint);
* optionally (``preference_pairs > 0``) preference accuracy on held-out pairs: with a reference
  (``reference=`` or the base under a PEFT adapter) the implicit-reward accuracy and mean margin
  of ``log π(y|x) − log π_ref(y|x)``; without one, the accuracy of the per-token mean log-prob.

``limit`` selects a fixed stratified subset: per category, a share proportional to its size (at
least one prompt each), the prompts with the smallest ``sha256(id)`` — so before/after
comparisons on the same ``limit`` see the same prompts, whatever the seed. ``limit_per_category``
instead keeps at most that many prompts of *each* category (same ranking), which keeps the small
benign and look-dangerous sets whole while capping the large harmful one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["evaluate", "stratified_subset", "write_results", "results_markdown"]

CATEGORIES = ("harmful", "benign", "look_dangerous")


def _ranked(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())


def stratified_subset(rows: list[dict], limit: int | None, per_category: int | None = None) -> list[dict]:
    """Fixed, category-stratified subset of at most ``limit`` rows (all rows when ``limit`` is None).

    With ``per_category``, first keep at most that many rows of each category.
    """
    if per_category is not None:
        if per_category <= 0:
            raise ValueError(f"per_category must be positive, got {per_category}")
        by = defaultdict(list)
        for r in rows:
            by[r["category"]].append(r)
        rows = [r for c in sorted(by) for r in _ranked(by[c])[:per_category]]
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    by = defaultdict(list)
    for r in rows:
        by[r["category"]].append(r)
    cats = sorted(by)
    quota = {c: max(1, math.floor(limit * len(by[c]) / len(rows))) for c in cats}
    # Hand leftover slots to the largest categories; trim if the minimum of one overshoots.
    while sum(quota.values()) < limit:
        c = max((c for c in cats if quota[c] < len(by[c])), key=lambda c: len(by[c]) - quota[c], default=None)
        if c is None:
            break
        quota[c] += 1
    while sum(quota.values()) > limit:
        c = max(cats, key=lambda c: quota[c])
        quota[c] -= 1
    out = []
    for c in cats:
        out += _ranked(by[c])[: quota[c]]
    return out


def _load_policy(model_name_or_path, adapter):
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_name_or_path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tok


def _sequence_logps(model, tok, prompts: list[str], completions: list[str], batch_size: int) -> np.ndarray:
    """(N, 2): summed completion log-prob and completion token count under ``model``."""
    import torch

    from llm_safepref.data.sampling import format_chat

    out = [None] * len(prompts)
    tok.padding_side = "right"
    # Tokenise once, then batch in length order so little compute goes to padding.
    seqs = []
    for p, c in zip(prompts, completions):
        p_ids = tok(format_chat(tok, p), add_special_tokens=False).input_ids
        c_ids = tok(c + (tok.eos_token or ""), add_special_tokens=False).input_ids[:256]
        seqs.append((p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)))
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids = [seqs[i][0] for i in idx]
        masks = [seqs[i][1] for i in idx]
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, T)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        comp = torch.tensor([m + [0] * (width - len(m)) for m in masks])  # (B, T) 1 on completion tokens
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=attn, output_hidden_states=True,
                           logits_to_keep=1).hidden_states[-1]  # (B, T, H) final, normed
            m = comp[:, 1:].bool()  # (B, T-1): positions whose *next* token is a completion token
            # Project only the positions we score: a full (B, T, V) log-softmax is the slow part.
            h = hidden[:, :-1][m]  # (K, H)
            logits = model.get_output_embeddings()(h).float()  # (K, V)
            tgt = input_ids[:, 1:][m]  # (K,)
            tok_logp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]  # (K,)
        row = torch.arange(m.shape[0])[:, None].expand_as(m)[m]  # (K,) batch index of each scored token
        sums = torch.zeros(m.shape[0]).index_add_(0, row, tok_logp)
        for i, total, count in zip(idx, sums.tolist(), m.sum(-1).float().tolist()):
            out[i] = (total, count)
    return np.asarray(out, dtype=np.float64)


def _preference_metrics(model, tok, pairs, *, reference, adapter, batch_size: int) -> dict:
    prompts = [p["prompt"] for p in pairs]
    c = _sequence_logps(model, tok, prompts, [p["chosen"] for p in pairs], batch_size)
    r = _sequence_logps(model, tok, prompts, [p["rejected"] for p in pairs], batch_size)
    res = {"n_pairs": len(pairs)}
    ref_c = ref_r = None
    if reference is not None:
        from llm_safepref.models import load_model_and_tokenizer

        ref_model, ref_tok = load_model_and_tokenizer(reference)
        ref_c = _sequence_logps(ref_model, ref_tok, prompts, [p["chosen"] for p in pairs], batch_size)
        ref_r = _sequence_logps(ref_model, ref_tok, prompts, [p["rejected"] for p in pairs], batch_size)
        del ref_model
    elif adapter is not None and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ref_c = _sequence_logps(model, tok, prompts, [p["chosen"] for p in pairs], batch_size)
            ref_r = _sequence_logps(model, tok, prompts, [p["rejected"] for p in pairs], batch_size)
    if ref_c is not None:
        margin = (c[:, 0] - ref_c[:, 0]) - (r[:, 0] - ref_r[:, 0])  # (N,) implicit reward margin (β = 1)
        res.update(preference_accuracy=round(float((margin > 0).mean()), 4),
                   reward_margin_mean=round(float(margin.mean()), 4), preference_kind="implicit_reward_vs_reference")
    else:
        mean_c, mean_r = c[:, 0] / np.maximum(c[:, 1], 1), r[:, 0] / np.maximum(r[:, 1], 1)
        res.update(preference_accuracy=round(float((mean_c > mean_r).mean()), 4),
                   logp_margin_mean=round(float((mean_c - mean_r).mean()), 4), preference_kind="mean_token_logp")
    return res


def evaluate(
    model_name_or_path="embedded",
    *,
    adapter=None,
    split: str = "test",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    limit_per_category: int | None = None,
    seed: int = 0,
    do_sample: bool = False,
    temperature: float = 0.8,
    benchmark="embedded",
    preference_pairs: int = 0,
    reference=None,
    judge=None,
    progress: bool = True,
    keep_generations: bool = False,
) -> dict:
    """Evaluate a model (+ optional PEFT adapter) on the benchmark's ``split``; returns the metrics dict."""
    import torch

    from llm_safepref.data import constraints as cons
    from llm_safepref.data.adapters import load_eval_prompts, load_preference_dataset
    from llm_safepref.data.sampling import generate_responses
    from llm_safepref.judge import load_judge

    t0 = time.time()
    torch.manual_seed(seed)
    rows = [dict(r) for r in load_eval_prompts(benchmark, split)]
    rows = stratified_subset(rows, limit, per_category=limit_per_category)
    judge = judge or load_judge()
    model, tok = _load_policy(model_name_or_path, adapter)
    responses = generate_responses(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, do_sample=do_sample, temperature=temperature, seed=seed,
                                   progress=progress, desc="eval")
    verdicts = judge.judge([r["prompt"] for r in rows], responses)
    per_type = defaultdict(list)
    for r, resp, v in zip(rows, responses, verdicts):
        r.update(response=resp, is_harmful=v["is_harmful"], is_refusal=v["is_refusal"], harm_score=v["harm_score"])
        cs = json.loads(r["constraints"]) if r["category"] == "benign" else []
        checks = cons.check_all(cs, resp)
        r["constraints_ok"] = checks
        for c, ok in zip(cs, checks):
            per_type[c["type"]].append(ok)

    def rate(values):
        return round(float(np.mean(values)), 4) if len(values) else None

    by = defaultdict(list)
    for r in rows:
        by[r["category"]].append(r)
    not_harmful = by["benign"] + by["look_dangerous"]
    result = {
        "model": str(model_name_or_path),
        "adapter": str(adapter) if adapter is not None else None,
        "split": split,
        "harmful_compliance_rate": rate([r["is_harmful"] for r in by["harmful"]]),
        "harmful_refusal_rate": rate([r["is_refusal"] for r in by["harmful"]]),
        "over_refusal_rate": rate([r["is_refusal"] for r in not_harmful]),
        "benign_refusal_rate": rate([r["is_refusal"] for r in by["benign"]]),
        "look_dangerous_refusal_rate": rate([r["is_refusal"] for r in by["look_dangerous"]]),
        "instruction_following_rate": rate([all(r["constraints_ok"]) for r in by["benign"] if r["constraints_ok"]]),
        "constraint_following_rate": rate([ok for r in by["benign"] for ok in r["constraints_ok"]]),
        "constraint_following_by_type": {k: rate(v) for k, v in sorted(per_type.items())},
        "mean_harm_score_harmful": rate([r["harm_score"] for r in by["harmful"]]),
        "n_prompts": len(rows),
        "n_by_category": {c: len(by[c]) for c in CATEGORIES},
        "judge_version": judge.version,
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": do_sample,
                       "temperature": temperature if do_sample else None, "seed": seed, "limit": limit,
                       "limit_per_category": limit_per_category},
    }
    if preference_pairs:
        pairs = [dict(p) for p in load_preference_dataset(benchmark, split)]
        pairs = sorted(pairs, key=lambda p: hashlib.sha256((p["prompt"] + p["rejected"][:64]).encode()).hexdigest())
        result["preference"] = _preference_metrics(model, tok, pairs[:preference_pairs], reference=reference,
                                                   adapter=adapter, batch_size=max(1, batch_size // 2))
    result["examples"] = {c: [{"prompt": r["prompt"], "response": r["response"], "is_harmful": r["is_harmful"],
                               "is_refusal": r["is_refusal"]} for r in by[c][:2]] for c in CATEGORIES}
    if keep_generations:
        result["generations"] = rows
    result["seconds"] = round(time.time() - t0, 1)
    result["date"] = datetime.date.today().isoformat()
    result["machine"] = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
                         if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    return result


def results_markdown(result: dict) -> str:
    """A Markdown table of the headline metrics."""
    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [
        f"# Safety evaluation: {result['model']}" + (f" + {result['adapter']}" if result.get("adapter") else ""),
        "",
        f"Split `{result['split']}`, {result['n_prompts']} prompts {result['n_by_category']}, judge `{result['judge_version']}`.",
    ]
    if result.get("command"):
        lines.append(f"Command: `{result['command']}` — {result.get('date')}, {result.get('machine')}, {result.get('seconds')} s.")
    lines += ["", "| metric | value | better |", "|---|---|---|"]
    for key, better in [("harmful_compliance_rate", "lower"), ("harmful_refusal_rate", "higher"),
                        ("over_refusal_rate", "lower"), ("benign_refusal_rate", "lower"),
                        ("look_dangerous_refusal_rate", "lower"), ("instruction_following_rate", "higher"),
                        ("constraint_following_rate", "higher")]:
        lines.append(f"| {key} | {fmt(result.get(key))} | {better} |")
    if result.get("preference"):
        p = result["preference"]
        lines.append(f"| preference_accuracy ({p['preference_kind']}, {p['n_pairs']} pairs) | {fmt(p['preference_accuracy'])} | higher |")
    if result.get("constraint_following_by_type"):
        lines += ["", "| constraint type | satisfied |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in result["constraint_following_by_type"].items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``result`` as JSON at ``path`` and the Markdown table next to it (``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "generations"}
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    md = path.with_suffix(".md")
    md.write_text(results_markdown(result))
    if "generations" in result:
        with open(path.with_suffix(".generations.jsonl"), "w", encoding="utf-8") as f:
            for r in result["generations"]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path, md
