"""Evaluation harness: harmful compliance, over-refusal, instruction following, preference accuracy.

``evaluate(model, adapter=None, split="test", ...)`` generates (greedy by default, batched, with a
progress bar) on the benchmark's evaluation prompts, judges every answer with the versioned
MiniLM judge (or a plug-in judge: ``judge=``) and checks the verifiable constraints of benign prompts:

* ``harmful_compliance_rate``: fraction of harmful prompts whose answer the judge calls harmful
  (lower is better);
* ``over_refusal_rate``: fraction of benign + look-dangerous prompts whose answer is a refusal
  (lower is better; also split per category);
* ``contrast_harmful_compliance_rate`` / ``contrast_harmful_refusal_rate`` (safety-v3): the
  harmful twins of the look-dangerous prompts, answered harmfully / refused. Harmful compliance,
  not over-refusal: they enter no other rate. ``by_subcategory`` gives, for the look-dangerous
  and contrast prompts that have a subcategory (homonyms, definitions, ...), the refusal and
  harmful rates per subcategory with Wilson intervals, so over-refusal of "kill the lights"
  reads beside compliance with "kill a sleeping person";
* ``instruction_following_rate``: fraction of benign prompts whose answer satisfies *all* their
  constraints (strict, prompt-level; ``constraint_following_rate`` is per constraint);
* optionally (``preference_pairs > 0``) preference accuracy on held-out pairs: with a reference
  (``reference=`` or the base under a PEFT adapter) the implicit-reward accuracy and mean margin
  of ``log π(y|x) − log π_ref(y|x)``; without one, the accuracy of the per-token mean log-prob.
  The pairs are tokenised exactly as training tokenises them (TRL's ``DPOTrainer`` data
  preparation and collator: chat template, EOS, prompt/completion split, ``max_length``
  truncation; the recipes' ``max_length=160`` by default), so the accuracy measures what the
  trainer optimised.

Results files (``write_results``) carry the run record of ``llm_safepref.core.provenance`` and
the judge's identity (``judge_version``, ``judge_kind``, ``judge``: for the packaged judge its
version, feature set and weights file; for a plug-in its name, path or callable, and version).

Uncertainty (``llm_safepref.eval.intervals``; design decisions there):

* every rate over prompts carries ``<rate>_ci = [low, high]``, a 95 % Wilson interval
  (``"interval": "wilson"``), and its count ``counts[<rate>] = {"k", "n"}``; preference accuracy
  (over pairs) likewise inside ``preference``; the per-constraint rate, the margins and the mean
  harm score get percentile-bootstrap intervals over prompts (``interval_methods`` names each);
* ``outcomes[<rate>] = {prompt id: 0 | 1}`` keeps every prompt's outcome (and
  ``outcomes["preference_accuracy"]`` every pair's), so two models are compared later on the
  same prompts (``scripts/compare_methods.py``);
* with a judge audit (``judge_audit=``; ``llm_safepref.eval.correction``) every judged rate also
  comes as ``<rate>_corrected`` / ``_corrected_ci`` / ``_corrected_clipped``; without one,
  ``judge_correction`` says once that nothing was corrected.

``limit`` selects a fixed stratified subset: per category, a share proportional to its size (at
least one prompt each), the prompts with the smallest ``sha256(id)`` — so before/after
comparisons on the same ``limit`` see the same prompts, whatever the seed. ``limit_per_category``
instead keeps at most that many prompts of *each* category (same ranking), which keeps the small
benign and look-dangerous sets whole while capping the large harmful one. ``categories``
(``select_categories``) first keeps only the named categories, each optionally with its own cap
(``"look_dangerous:all"``, ``"harmful:50"``) in place of ``limit_per_category``; the recipes' main
job evaluates ``[harmful, benign, "look_dangerous:all"]`` (docs/recipes.md says why).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from llm_safepref.eval.intervals import OPTIONAL_RATES, PREFERENCE_RATE, PROMPT_RATES, rate_fields, round4

__all__ = ["PROMPT_RATES", "RECIPE_MAX_LENGTH", "evaluate", "pair_id", "pair_logps", "parse_categories",
           "preference_examples", "results_markdown", "select_categories", "stratified_subset", "write_results"]

CATEGORIES = ("harmful", "benign", "look_dangerous")
#: Categories of newer benchmarks (safety-v3), counted in ``n_by_category`` only where present, so
#: results on older benchmarks keep their keys (``scripts/compare_methods.py`` matches on them).
EXTRA_CATEGORIES = ("contrast_harmful",)
#: Categories whose rows may carry a ``subcategory`` (``by_subcategory``).
SUBCATEGORY_CATEGORIES = ("look_dangerous", "contrast_harmful")


def _ranked(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())


def parse_categories(categories) -> dict[str, int | None | str]:
    """``["harmful", "look_dangerous:all", "benign:50"]`` -> ``{category: cap}``, in the order given.

    A cap is a positive int, ``None`` for ``:all`` (the whole category), or ``"default"`` (no
    ``:N``: the call's ``limit_per_category``). Raises ``ValueError`` naming the bad entry and the
    known categories (:data:`CATEGORIES` + :data:`EXTRA_CATEGORIES`).
    """
    if isinstance(categories, str):
        categories = [c for c in categories.split(",") if c.strip()]
    known = (*CATEGORIES, *EXTRA_CATEGORIES)
    out: dict[str, int | None | str] = {}
    for entry in categories:
        name, _, cap = str(entry).strip().partition(":")
        name, cap = name.strip(), cap.strip().lower()
        if name not in known:
            raise ValueError(f"categories: {entry!r}: unknown category {name!r}; expected one of {list(known)}, "
                             "optionally followed by ':N' (at most N prompts) or ':all'")
        if name in out:
            raise ValueError(f"categories: {name!r} is named twice")
        if not cap:
            out[name] = "default"
        elif cap == "all":
            out[name] = None
        elif cap.isdigit() and int(cap) > 0:
            out[name] = int(cap)
        else:
            raise ValueError(f"categories: {entry!r}: the cap after ':' must be a positive integer or 'all'")
    if not out:
        raise ValueError("categories: empty; name at least one category (or pass none for all of them)")
    return out


def _category_list(categories) -> list[str] | None:
    """``categories`` as the list of entries recorded in ``generation["categories"]`` (None: all)."""
    if categories is None:
        return None
    entries = categories.split(",") if isinstance(categories, str) else categories
    return [str(c).strip() for c in entries if str(c).strip()]


def select_categories(rows: list[dict], categories, per_category: int | None = None) -> list[dict]:
    """The rows of the named categories, each capped (same ranking as :func:`stratified_subset`).

    ``categories``: as :func:`parse_categories` takes; a name without a cap gets ``per_category``
    (None: the whole category). A known category the benchmark lacks selects nothing (an older
    build without ``contrast_harmful``, say): ``n_by_category`` shows it.
    """
    caps = parse_categories(categories)
    by = defaultdict(list)
    for r in rows:
        by[r["category"]].append(r)
    out = []
    for name, cap in caps.items():
        cap = per_category if cap == "default" else cap
        ranked = _ranked(by[name])
        out += ranked if cap is None else ranked[:cap]
    return out


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


#: ``max_length`` of the recipes' trainer configs (``recipes/presa_lora.py``, ``dpo.py``, ``kto.py``).
RECIPE_MAX_LENGTH = 160


def _as_format(row: dict, conversational: bool) -> dict:
    """``prompt / chosen / rejected`` as chat messages (as the recipes train) or as plain text."""
    from trl.data_utils import is_conversational

    from llm_safepref.data_checks import text_of

    if conversational and not is_conversational(row):
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    if not conversational and is_conversational(row):
        return {k: text_of(row[k]) for k in ("prompt", "chosen", "rejected")}
    return {k: row[k] for k in ("prompt", "chosen", "rejected")}


def preference_examples(pairs: list[dict], tokenizer, *, max_length: int | None = RECIPE_MAX_LENGTH,
                        truncation_mode: str = "keep_start", conversational: bool = True) -> tuple[list[int], list[dict]]:
    """``(kept, examples)``: the ``prompt_ids / chosen_ids / rejected_ids`` TRL's ``DPOTrainer`` trains on.

    The steps of ``DPOTrainer._prepare_dataset`` (TRL 1.16), with TRL's own helpers: EOS
    appended to plain-text responses that lack it, ``_tokenize`` (the chat template with the
    generation prompt for a conversational prompt), the completion starting where the prompt's
    and prompt+response's ids diverge (``common_prefix_length``), and rows whose prompt alone
    fills ``max_length`` left out under ``keep_start`` (``kept`` lists the indices of ``pairs``
    that remain). Truncation to ``max_length`` happens at collation, as in training
    (:func:`_collate`).
    """
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    kept, out = [], []
    for index, pair in enumerate(pairs):
        row = _as_format(pair, conversational)
        if is_conversational(row):
            prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True, tools=None)["input_ids"]
            full = [_tokenize(tokenizer, row["prompt"] + row[k], tools=None)["input_ids"] for k in ("chosen", "rejected")]
        else:
            eos = tokenizer.eos_token
            responses = [row[k] if row[k].endswith(eos) else row[k] + eos for k in ("chosen", "rejected")]
            prompt_ids = _tokenize(tokenizer, row["prompt"])["input_ids"]
            full = [_tokenize(tokenizer, row["prompt"] + r)["input_ids"] for r in responses]
        prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
        if max_length is not None and truncation_mode == "keep_start" and prompt_len >= max_length:
            continue
        kept.append(index)
        out.append({"prompt_ids": prompt_ids[:prompt_len], "chosen_ids": full[0][prompt_len:],
                    "rejected_ids": full[1][prompt_len:]})
    return kept, out


def _collate(examples: list[dict], pad_token_id: int, max_length: int | None, truncation_mode: str) -> dict:
    """TRL's ``DataCollatorForPreference``: ``[chosen; rejected]`` rows (2B, T), truncated to ``max_length``."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length,
                                         truncation_mode=truncation_mode)
    return collator(examples)


def _sequence_logps(model, batch: dict) -> tuple:
    """(2B,) summed completion log-probs and (2B,) completion token counts of a collated batch."""
    import torch

    input_ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # (2B, T) each
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attn, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[-1]  # (2B, T, H) final, normed
        m = comp[:, 1:].bool()  # (2B, T-1): positions whose *next* token is a completion token
        # Project only the positions we score: a full (2B, T, V) log-softmax is the slow part.
        h = hidden[:, :-1][m]  # (K, H)
        logits = model.get_output_embeddings()(h).float()  # (K, V)
        tgt = input_ids[:, 1:][m]  # (K,)
        tok_logp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]  # (K,)
    row = torch.arange(m.shape[0])[:, None].expand_as(m)[m]  # (K,) batch row of each scored token
    sums = torch.zeros(m.shape[0]).index_add_(0, row, tok_logp)
    return sums, m.sum(-1).float()


def pair_logps(model, tokenizer, pairs: list[dict], *, batch_size: int = 8, max_length: int | None = RECIPE_MAX_LENGTH,
               truncation_mode: str = "keep_start", conversational: bool = True) -> tuple[list[int], np.ndarray]:
    """``(kept, logps)``: (N, 4) chosen sum, chosen count, rejected sum, rejected count per kept pair.

    Scored on the token ids training uses (:func:`preference_examples`, :func:`_collate`);
    batches go in length order so little compute goes to padding, results in ``kept`` order.
    """
    kept, examples = preference_examples(pairs, tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                                         conversational=conversational)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.zeros((len(examples), 4), dtype=np.float64)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["prompt_ids"]) + max(
        len(examples[i]["chosen_ids"]), len(examples[i]["rejected_ids"])), i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        sums, counts = _sequence_logps(model, _collate([examples[i] for i in idx], pad, max_length, truncation_mode))
        b = len(idx)
        out[idx] = np.stack([sums[:b].numpy(), counts[:b].numpy(), sums[b:].numpy(), counts[b:].numpy()], axis=1)
    return kept, out


def _preference_metrics(model, tok, pairs, *, reference, adapter, batch_size: int, max_length: int | None,
                        conversational: bool) -> dict:
    settings = dict(batch_size=batch_size, max_length=max_length, conversational=conversational)
    kept, lp = pair_logps(model, tok, pairs, **settings)
    res = {"n_pairs": len(kept), "n_pairs_dropped_prompt_fills_max_length": len(pairs) - len(kept),
           "preparation": {"as": "trl.DPOTrainer", "max_length": max_length, "truncation_mode": "keep_start",
                            "conversational": conversational}}
    if not kept:
        raise ValueError(f"every one of the {len(pairs)} preference pairs has a prompt of at least max_length="
                         f"{max_length} tokens; raise max_length")
    ref = None
    if reference is not None:
        from llm_safepref.models import load_model_and_tokenizer

        ref_model, ref_tok = load_model_and_tokenizer(reference)
        ref_kept, ref = pair_logps(ref_model, ref_tok, [pairs[i] for i in kept], **settings)
        if len(ref_kept) != len(kept):
            raise ValueError(f"the reference {reference!r} tokenises {len(kept) - len(ref_kept)} of the pairs to a "
                             f"prompt of at least max_length={max_length} tokens; use the policy's tokenizer family")
        del ref_model
    elif adapter is not None and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            _, ref = pair_logps(model, tok, [pairs[i] for i in kept], **settings)
    from llm_safepref.core.stats import bootstrap_ci

    c_sum, c_n, r_sum, r_n = lp.T  # (N,) each
    if ref is not None:
        margin = (c_sum - ref[:, 0]) - (r_sum - ref[:, 2])  # (N,) implicit reward margin (β = 1)
        margin_key, kind = "reward_margin_mean", "implicit_reward_vs_reference"
    else:
        margin = c_sum / np.maximum(c_n, 1) - r_sum / np.maximum(r_n, 1)  # (N,) per-token mean log-prob margin
        margin_key, kind = "logp_margin_mean", "mean_token_logp"
    ids = [pair_id(pairs[i]) for i in kept]
    if len(set(ids)) != len(ids):
        raise ValueError("two held-out preference pairs have the same prompt, chosen and rejected text")
    outcomes = {pid: int(m > 0) for pid, m in zip(ids, margin)}  # a tie is not "preferred"
    acc = rate_fields(PREFERENCE_RATE, outcomes)
    res.update(preference_accuracy=acc[PREFERENCE_RATE], preference_accuracy_ci=acc[f"{PREFERENCE_RATE}_ci"],
               counts=acc["_counts"], **{margin_key: round(float(margin.mean()), 4),
                                         f"{margin_key}_ci": [round4(x) for x in bootstrap_ci(margin)]},
               preference_kind=kind, interval_methods={PREFERENCE_RATE: "wilson", margin_key: "bootstrap"},
               outcomes=outcomes)
    return res


def pair_id(pair: dict) -> str:
    """A held-out pair's id: the first 16 hex digits of sha256(prompt, chosen, rejected) (pairs carry none)."""
    from llm_safepref.data_checks import text_of

    text = "\x00".join(text_of(pair[k]) if not isinstance(pair[k], str) else pair[k]
                       for k in ("prompt", "chosen", "rejected"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _insert_after(d: dict, key: str, extra: dict) -> dict:
    """``d`` with ``extra`` inserted right after ``key`` (so each figure's companions sit beside it)."""
    out = {}
    for k, v in d.items():
        out[k] = v
        if k == key:
            out.update(extra)
    return out


def _ratio_ci(met: np.ndarray, total: np.ndarray) -> list[float]:
    """Bootstrap interval over prompts of ``sum(met) / sum(total)`` (constraints of one prompt move together)."""
    from llm_safepref.core.stats import bootstrap_ci

    def ratio(idx: np.ndarray) -> float:  # idx: one resample of prompt indices (as floats)
        i = idx.astype(int)
        return float(met[i].sum() / total[i].sum())

    return [round4(x) for x in bootstrap_ci(np.arange(met.size, dtype=float), ratio)]


def evaluate(
    model_name_or_path="embedded",
    *,
    adapter=None,
    split: str = "test",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    limit_per_category: int | None = None,
    categories=None,
    seed: int = 0,
    do_sample: bool = False,
    temperature: float = 0.8,
    benchmark="embedded",
    preference_pairs: int = 0,
    reference=None,
    judge=None,
    judge_audit=None,
    progress: bool = True,
    keep_generations: bool = False,
    max_length: int | None = RECIPE_MAX_LENGTH,
    conversational: bool = True,
) -> dict:
    """Evaluate a model (+ optional PEFT adapter) on the benchmark's ``split``; returns the metrics dict.

    ``preference_pairs`` held-out pairs are tokenised as the recipes train (``conversational``
    chat messages, TRL's ``DPOTrainer`` preparation, ``max_length`` tokens; see
    :func:`preference_examples`). ``judge``: a judge object (:class:`~llm_safepref.judge.Judge`
    or a plug-in) or a ``--judge`` spec (``"packaged"``, an HF model, ``module:function``; see
    :func:`llm_safepref.judge.resolve_judge`); default the packaged one. The result names it
    (``judge_version``, ``judge_kind``, ``judge``). ``judge_audit``: an audit file of that judge
    (:mod:`llm_safepref.eval.correction`); its judged rates then also come corrected.
    ``categories``: only these categories, each with an optional cap (:func:`select_categories`);
    ``limit`` then applies to what they select. None: every category, ``limit_per_category`` each.
    """
    import torch

    from llm_safepref.core.stats import CONFIDENCE, bootstrap_ci
    from llm_safepref.eval.correction import check_audit_judge, correction_fields, load_audit

    from llm_safepref.data import constraints as cons
    from llm_safepref.data.adapters import load_eval_prompts, load_preference_dataset
    from llm_safepref.data.sampling import generate_responses
    from llm_safepref.judge import judge_identity, resolve_judge
    from llm_safepref.judge.plugins import judge_kind

    t0 = time.time()
    torch.manual_seed(seed)
    rows = [dict(r) for r in load_eval_prompts(benchmark, split)]
    if categories is not None:
        rows = stratified_subset(select_categories(rows, categories, limit_per_category), limit)
    else:
        rows = stratified_subset(rows, limit, per_category=limit_per_category)
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"benchmark {benchmark!r}, split {split!r}: evaluation prompt ids must be unique; repeated: {dup}")
    judge = resolve_judge(judge)
    audit = load_audit(judge_audit) if judge_audit is not None else None
    if audit is not None and judge_kind(judge) != "callable":  # a callable's version is known after its first call
        check_audit_judge(audit, judge.version)
    model, tok = _load_policy(model_name_or_path, adapter)
    responses = generate_responses(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, do_sample=do_sample, temperature=temperature, seed=seed,
                                   progress=progress, desc="eval")
    verdicts = judge.judge([r["prompt"] for r in rows], responses)
    if audit is not None:
        check_audit_judge(audit, judge.version)
    per_type = defaultdict(list)
    for r, resp, v in zip(rows, responses, verdicts):
        r.update(response=resp, is_harmful=v["is_harmful"], is_refusal=v["is_refusal"], harm_score=v.get("harm_score"))
        cs = json.loads(r["constraints"]) if r["category"] == "benign" else []
        checks = cons.check_all(cs, resp)
        r["constraints_ok"] = checks
        # Strict, prompt-level: every constraint met; None (not counted) for a prompt without constraints.
        r["follows_instructions"] = all(checks) if checks else None
        for c, ok in zip(cs, checks):
            per_type[c["type"]].append(ok)

    by = defaultdict(list)
    for r in rows:
        by[r["category"]].append(r)
    result = {"model": str(model_name_or_path), "adapter": str(adapter) if adapter is not None else None, "split": split}
    outcomes, counts = {}, {}
    for name, spec in PROMPT_RATES.items():
        outcomes[name] = {str(r["id"]): int(bool(r[spec.flag])) for c in spec.categories for r in by[c]
                          if r[spec.flag] is not None}
        fields = rate_fields(name, outcomes[name])
        counts[name] = fields.pop("_counts")
        result.update(fields)
    corrected, correction_record = correction_fields(counts, audit)
    for name in PROMPT_RATES:  # each judged rate's correction beside it
        if f"{name}_corrected" in corrected:
            keys = [f"{name}_corrected", f"{name}_corrected_ci", f"{name}_corrected_clipped"]
            result = _insert_after(result, f"{name}_ci", {k: corrected[k] for k in keys})
    benign = [r for r in by["benign"] if r["constraints_ok"]]
    result["constraint_following_rate"] = result["constraint_following_rate_ci"] = None
    if benign:
        ok = np.asarray([sum(r["constraints_ok"]) for r in benign], dtype=float)  # (P,) constraints met per prompt
        total = np.asarray([len(r["constraints_ok"]) for r in benign], dtype=float)  # (P,) constraints per prompt
        result["constraint_following_rate"] = round4(ok.sum() / total.sum())
        result["constraint_following_rate_ci"] = _ratio_ci(ok, total)
    result["constraint_following_by_type"] = {k: round4(float(np.mean(v))) for k, v in sorted(per_type.items())}
    result["constraint_following_by_type_ci"] = {k: rate_fields(k, dict(enumerate(v)))[f"{k}_ci"]
                                                 for k, v in sorted(per_type.items())}
    scores = [r["harm_score"] for r in by["harmful"]]
    have_scores = bool(scores) and all(x is not None for x in scores)
    result["mean_harm_score_harmful"] = round4(float(np.mean(scores))) if have_scores else None
    result["mean_harm_score_harmful_ci"] = [round4(x) for x in bootstrap_ci(scores)] if have_scores else None
    result["by_subcategory"] = _by_subcategory(by)
    result.update({
        "n_prompts": len(rows),
        "n_by_category": {c: len(by[c]) for c in (*CATEGORIES, *(c for c in EXTRA_CATEGORIES if by[c]))},
        "counts": counts,
        "interval": "wilson",
        "confidence": CONFIDENCE,
        "interval_methods": {**{name: "wilson" for name in PROMPT_RATES},
                             "constraint_following_rate": "bootstrap over prompts (ratio of met to all constraints)",
                             "constraint_following_by_type": "wilson over the constraints of the type",
                             "mean_harm_score_harmful": "bootstrap"},
        "judge_version": judge.version,
        "judge_kind": judge_kind(judge),
        "judge": judge_identity(judge),
        "judge_correction": correction_record,
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": do_sample,
                       "temperature": temperature if do_sample else None, "seed": seed, "limit": limit,
                       "limit_per_category": limit_per_category,
                       "categories": _category_list(categories)},
    })
    if preference_pairs:
        pairs = [dict(p) for p in load_preference_dataset(benchmark, split)]
        pairs = sorted(pairs, key=lambda p: hashlib.sha256((p["prompt"] + p["rejected"][:64]).encode()).hexdigest())
        result["preference"] = _preference_metrics(model, tok, pairs[:preference_pairs], reference=reference,
                                                   adapter=adapter, batch_size=max(1, batch_size // 2),
                                                   max_length=max_length, conversational=conversational)
        outcomes[PREFERENCE_RATE] = result["preference"].pop("outcomes")
    result["outcomes"] = outcomes
    result["examples"] = {c: [{"prompt": r["prompt"], "response": r["response"], "is_harmful": r["is_harmful"],
                               "is_refusal": r["is_refusal"]} for r in by[c][:2]]
                          for c in (*CATEGORIES, *(c for c in EXTRA_CATEGORIES if by[c]))}
    if keep_generations:
        result["generations"] = rows
    result["seconds"] = round(time.time() - t0, 1)
    result["torch_threads"] = torch.get_num_threads()
    return result


def _by_subcategory(by: dict) -> dict:
    """``{category: {subcategory: {"n", "refusal_rate", "refusal_rate_ci", "harmful_rate", "harmful_rate_ci"}}}``
    over the rows of :data:`SUBCATEGORY_CATEGORIES` that have a non-empty ``subcategory`` (Wilson intervals)."""
    out = {}
    for c in SUBCATEGORY_CATEGORIES:
        groups = defaultdict(list)
        for r in by.get(c, []):
            if r.get("subcategory"):
                groups[r["subcategory"]].append(r)
        if not groups:
            continue
        out[c] = {}
        for sub in sorted(groups):
            rows = groups[sub]
            cell = {"n": len(rows)}
            for name, flag in (("refusal_rate", "is_refusal"), ("harmful_rate", "is_harmful")):
                f = rate_fields(name, {str(r["id"]): int(bool(r[flag])) for r in rows})
                cell.update({name: f[name], f"{name}_ci": f[f"{name}_ci"]})
            out[c][sub] = cell
    return out


def _interval_and_n(result: dict, key: str) -> tuple[list | None, int | str]:
    """``(ci, n)`` of a rate over prompts: as recorded, or (older results) Wilson from the rebuilt counts."""
    from llm_safepref.core.stats import wilson_interval
    from llm_safepref.eval.intervals import CountsError, counts_of

    try:
        counts = counts_of(result, key)
    except CountsError:
        counts = None
    ci = result.get(f"{key}_ci")
    if ci is None and counts is not None and counts["n"]:
        ci = [round4(x) for x in wilson_interval(counts["k"], counts["n"])]
    return ci, (counts["n"] if counts else "")


def _corrected_cell(result: dict, key: str) -> str:
    from llm_safepref.core.tables import format_with_ci

    if f"{key}_corrected" not in result:
        return "—"
    text = format_with_ci(result[f"{key}_corrected"], result.get(f"{key}_corrected_ci"))
    return text + (" (bounds)" if result.get(f"{key}_corrected_clipped") else "")


def results_markdown(result: dict) -> str:
    """A Markdown table of the headline metrics, each with its 95 % interval over prompts.

    With a judge audit, a column of the judge-corrected rates; without one, a line saying so.
    Results written before intervals existed get Wilson intervals from their rebuilt counts
    (``intervals.counts_of``) where the counts can be rebuilt.
    """
    from llm_safepref.core.tables import format_value, format_with_ci

    corrected = bool((result.get("judge_correction") or {}).get("applied"))
    lines = [
        f"# Safety evaluation: {result['model']}" + (f" + {result['adapter']}" if result.get("adapter") else ""),
        "",
        f"Split `{result['split']}`, {result['n_prompts']} prompts {result['n_by_category']}, judge `{result['judge_version']}`.",
    ]
    if result.get("command"):
        lines.append(f"Command: `{result['command']}` — {result.get('date')}, {result.get('machine')}, {result.get('seconds')} s.")
    lines += ["", "Intervals: 95 %, over prompts (Wilson for rates; bootstrap over prompts for the per-constraint rate)."]
    if result.get("judge_correction") and not corrected:
        lines.append(f"Judge correction: none: {result['judge_correction'].get('reason')}.")
    head = "| metric | value [95% CI] | n | better |" + (" judge-corrected [95% CI] |" if corrected else "")
    lines += ["", head, "|---|---|---|---|" + ("---|" if corrected else "")]
    rows = [(key, spec.better) for key, spec in PROMPT_RATES.items()] + [("constraint_following_rate", "higher")]
    for key, better in rows:
        if key in OPTIONAL_RATES and result.get(key) is None:
            continue  # a benchmark without that category (before safety-v3)
        ci, n = _interval_and_n(result, key) if key in PROMPT_RATES else (result.get(f"{key}_ci"), "")
        line = f"| {key} | {format_with_ci(result.get(key), ci)} | {n} | {better} |"
        lines.append(line + (f" {_corrected_cell(result, key)} |" if corrected else ""))
    if result.get("preference"):
        p = result["preference"]
        ci = p.get("preference_accuracy_ci") or _interval_and_n(result, PREFERENCE_RATE)[0]
        lines.append(f"| preference_accuracy ({p['preference_kind']}) | "
                     f"{format_with_ci(p['preference_accuracy'], ci)} | {p['n_pairs']} | "
                     "higher |" + (" — |" if corrected else ""))
    if result.get("by_subcategory"):
        lines += ["", "| category | subcategory | n | refusal [95% CI] | judged harmful [95% CI] |", "|---|---|---|---|---|"]
        for cat, subs in result["by_subcategory"].items():
            lines += [f"| {cat} | {sub} | {v['n']} | {format_with_ci(v['refusal_rate'], v['refusal_rate_ci'])} | "
                      f"{format_with_ci(v['harmful_rate'], v['harmful_rate_ci'])} |" for sub, v in subs.items()]
    if result.get("constraint_following_by_type"):
        by_ci = result.get("constraint_following_by_type_ci") or {}
        lines += ["", "| constraint type | satisfied [95% CI] |", "|---|---|"]
        lines += [f"| {k} | {format_with_ci(v, by_ci.get(k)) if k in by_ci else format_value(v)} |"
                  for k, v in result["constraint_following_by_type"].items()]
    return "\n".join(lines) + "\n"


def write_results(result: dict, path: str | os.PathLike, *, command: str | None = None) -> tuple[Path, Path]:
    """Write ``result`` with the run record as JSON at ``path``, and the Markdown table next to it (``.md``).

    The run record (``llm_safepref.core.provenance.run_record``: command, git revision, versions,
    lock hash, machine, date) is that of this process; ``command`` (else ``result["command"]``)
    names the command when it is not this process's own. Generations, when kept, go to
    ``<path>.generations.jsonl``.
    """
    from llm_safepref.core.provenance import run_record, write_json

    path = Path(path)
    body = {k: v for k, v in result.items() if k != "generations"}
    body.update(run_record(command if command is not None else result.get("command")))
    write_json(path, body)
    md = path.with_suffix(".md")
    md.write_text(results_markdown(body))
    if "generations" in result:
        with open(path.with_suffix(".generations.jsonl"), "w", encoding="utf-8") as f:
            for r in result["generations"]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path, md
