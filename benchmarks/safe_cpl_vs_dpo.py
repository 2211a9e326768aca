"""Safe-CPL stage 1 vs TRL's DPO: step time and peak memory on the same batch and model.

    python benchmarks/safe_cpl_vs_dpo.py --models embedded --out results/safe_cpl_vs_dpo.json

The protocol of ``benchmarks/presa_vs_dpo.py`` (its helpers are reused): interleaved rounds,
every (model, method, round) in its own subprocess with fixed threads, step time = median over
the timed optimiser steps, ratio formed within a round, the headline the median of the
per-round ratios with their spread.

Design decisions:

* Both trainers have a reference model (the LoRA adapter disabled) and the DPO loss
  (``SafeCPLConfig(pref_loss="dpo")``), so the ratio is the cost of what Safe-CPL adds: the
  context sets (gathered from the cached feature table on the device), the set encoder, the
  reparameterised z, the soft-prompt projection, ``P`` extra positions in the policy forward
  and the KL term. The context embeddings are computed once at trainer construction (their
  time is recorded separately as ``setup_s``) and never per step: the step time shows it.
* The pairs are ``presa_vs_dpo``'s synthetic pairs with a ``user_id`` (4 users, round-robin),
  the same rows for both methods; context sets of 2-8 other pairs of the same user.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.presa_vs_dpo import PROTOCOL_ROUNDS, PROTOCOL_THREADS, _peak_memory_bytes, _synthetic_pairs, \
    interleaved_rounds, load_bench_model, spread, train_timed  # noqa: E402
from llm_safepref._runtime import offline_defaults  # noqa: E402
from llm_safepref.core.cli import ToolParser  # noqa: E402
from llm_safepref.core.provenance import run_record, write_json  # noqa: E402
from llm_safepref.core.tables import markdown_table, text_table  # noqa: E402

METHODS = ("dpo", "safe_cpl")
RATIOS = ("step_time_ratio", "peak_memory_ratio")
N_USERS = 4


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from llm_safepref.methods.safe_cpl import SafeCPLConfig, SafeCPLTrainer

    model, tokenizer, cuda = load_bench_model(args)
    steps = args.warmup + args.steps
    n = max(args.batch * steps, N_USERS * 12)
    pairs = _synthetic_pairs(n, seed=0, prompt_words=args.prompt_words, response_words=args.response_words)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "user_id": f"u{i % N_USERS}",
             "pair_id": f"p{i}"} for i, r in enumerate(pairs)]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    common = dict(output_dir=os.path.join(args.tmp, f"{args.model}-{args.method}"), max_steps=steps,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], bf16=cuda,
                  gradient_checkpointing=False, use_cpu=not cuda, max_length=args.max_length, seed=0,
                  dataloader_num_workers=0, per_device_train_batch_size=args.batch)
    t0 = time.perf_counter()
    if args.method == "dpo":
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
    else:
        config = SafeCPLConfig(pref_loss="dpo", context_min=2, context_max=8, **common)
        trainer = SafeCPLTrainer(model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=lora)
    setup_s = time.perf_counter() - t0
    timed = train_timed(trainer, args.warmup)
    return {"model": args.model, "method": args.method, "step_time_s": statistics.median(timed),
            "step_times_s": timed, "peak_memory_bytes": _peak_memory_bytes(), "setup_s": round(setup_s, 2),
            "device": ("cuda:" + torch.cuda.get_device_name(0)) if cuda else "cpu",
            "torch_threads": torch.get_num_threads()}


def _worker_command(args, model: str, method: str) -> list[str]:
    return [sys.executable, __file__, "--worker", "--model", model, "--method", method, "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--max_length", str(args.max_length),
            "--prompt_words", str(args.prompt_words), "--response_words", str(args.response_words),
            "--tmp", args.tmp, "--threads", str(args.threads)]


def round_ratios(run: dict[str, dict]) -> dict[str, float]:
    """Safe-CPL against DPO within one round."""
    return {"step_time_ratio": run["safe_cpl"]["step_time_s"] / run["dpo"]["step_time_s"],
            "peak_memory_ratio": run["safe_cpl"]["peak_memory_bytes"] / run["dpo"]["peak_memory_bytes"]}


def orchestrate(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               LLM_SAFEPREF_CACHE=os.path.join(args.tmp, "cache"),  # embeddings computed afresh: setup_s is honest
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for model in args.models:
        runs, per_round = interleaved_rounds(METHODS, args.rounds, lambda m: _worker_command(args, model, m), env,
                                             round_ratios, label=model)
        spreads = {name: spread([r[name] for r in per_round]) for name in RATIOS}
        results[model] = {
            "model": model,
            "batch": {"pairs_per_step": args.batch, "max_length": args.max_length, "prompt_words": args.prompt_words,
                      "response_words": args.response_words, "timed_steps": args.steps, "warmup_steps": args.warmup,
                      "rounds": args.rounds, "threads": args.threads, "users": N_USERS, "context_size": [2, 8]},
            **{name: spreads[name]["median"] for name in RATIOS}, "ratio_spread": spreads,
            "per_round_ratios": per_round,
            "step_time_s": {m: statistics.median(r["step_time_s"] for r in runs[m]) for m in METHODS},
            "setup_s": {m: statistics.median(r["setup_s"] for r in runs[m]) for m in METHODS},
            "device": runs["safe_cpl"][0]["device"], "runs": runs,
        }
    return results


def table(per_model: dict, *, markdown: bool) -> str:
    headers = ["model", "ratio", "median", "min", "q1", "q3", "max", "rounds"]
    labels = {"step_time_ratio": "step time Safe-CPL / DPO", "peak_memory_ratio": "peak memory Safe-CPL / DPO"}
    rows = [[model, labels[name], *(r["ratio_spread"][name][k] for k in ("median", "min", "q1", "q3", "max", "n"))]
            for model, r in per_model.items() for name in RATIOS]
    return markdown_table(headers, rows) if markdown else text_table(headers, rows)


def build_parser() -> ToolParser:
    p = ToolParser(prog="benchmarks/safe_cpl_vs_dpo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="'tiny', 'embedded', a Hub id or a path")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (both methods)")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=PROTOCOL_ROUNDS, help="interleaved repetitions per method")
    p.add_argument("--threads", type=int, default=PROTOCOL_THREADS, help="torch / OpenMP threads of every run")
    p.add_argument("--max_length", type=int, default=160)
    p.add_argument("--prompt_words", type=int, default=24)
    p.add_argument("--response_words", type=int, default=48)
    p.add_argument("--tmp", default="/tmp/llm_safepref_bench_safe_cpl", help="scratch folder of the runs")
    p.add_argument("--out", default=None, help="write the JSON record here, and the table next to it (.md)")
    p.add_argument("--worker", action="store_true", help="(internal) run one (model, method) in this process")
    p.add_argument("--model", help="(internal) the worker's model")
    p.add_argument("--method", choices=METHODS, help="(internal) the worker's method")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("rounds", "steps", "threads", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    offline_defaults()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    meets = args.rounds >= PROTOCOL_ROUNDS and args.threads == PROTOCOL_THREADS
    per_model = orchestrate(args)
    head = per_model[args.models[-1]]
    load = os.getloadavg()
    record = run_record(
        protocol={"rounds": args.rounds, "threads": args.threads, "meets_reporting_protocol": meets,
                  "ratio": "median over rounds of the per-round ratio (Safe-CPL's run against the DPO run of the "
                           "same round)"},
        note="interleaved subprocess runs; both with a reference model (adapter disabled) and the DPO loss; peak "
             "memory = process peak RSS on CPU",
        load_average_at_end=[round(x, 2) for x in load],
        model=head["model"], batch=head["batch"], **{name: head[name] for name in RATIOS},
        ratio_spread=head["ratio_spread"], results=per_model)
    print(table(per_model, markdown=False))
    if args.out:
        out = Path(args.out)
        write_json(out, record)
        out.with_suffix(".md").write_text(
            f"Safe-CPL vs DPO ({record['date']}; `{record['command']}`; {record['machine']}; {args.rounds} rounds at "
            f"{args.threads} threads; load average at the end {record['load_average_at_end']})\n\n"
            + table(per_model, markdown=True) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
