"""PRESA vs TRL's DPO vs the two-trainer alternative (DPO pass + KTO pass): step time and memory.

    python benchmarks/presa_vs_dpo.py --models tiny embedded --out results/presa_vs_dpo.json

Design decisions:

* Same model, same data, same batch, same LoRA adapter (reference = adapter disabled, as in
  the recipe) for every method; only the trainer differs.
* Each (model, method, round) runs in its own subprocess, so peak memory is that method's
  alone (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU), and methods are
  interleaved in a different order every round so drifting machine load hits all of them.
* Step time = median over the timed optimiser steps (after warm-up steps) of the wall time
  between ``on_step_begin`` and ``on_step_end``; the figure per method is the median over
  rounds. Ratios are reported, never absolute claims: these machines are noisy.
* The two-trainer alternative is what PRESA replaces: a DPO step on the pairs plus a KTO
  step (``apo_zero_unpaired``, the cheapest KTO variant: no KL forward) on the same 2B
  responses with their safety labels. Its cost per global batch is the sum of the two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dpo", "presa", "kto")


def _synthetic_pairs(n: int, seed: int, prompt_words: int, response_words: int) -> list[dict]:
    """Deterministic preference pairs with realistic lengths and both safety labels."""
    rng = random.Random(seed)
    vocab = (
        "the a how to make build safe help please cannot sorry will not here is recipe bread water "
        "chemical process linux python code explain list three steps first second third summary "
        "answer question because therefore people should never mix bleach ammonia kill stuck"
    ).split()

    def text(k):
        return " ".join(rng.choice(vocab) for _ in range(k))

    rows = []
    for i in range(n):
        safe_chosen = rng.random() < 0.8
        rows.append(
            {
                "prompt": text(prompt_words) + "?",
                "chosen": " " + text(response_words),
                "rejected": " " + text(response_words),
                "chosen_is_safe": safe_chosen,
                "rejected_is_safe": not safe_chosen if rng.random() < 0.7 else safe_chosen,
            }
        )
    return rows


def _peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def worker(args) -> dict:
    """One (model, method) run in this process; prints a JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from llm_safepref.models import build_tiny_model, resolve_model_name
    from llm_safepref.presa_config import PresaConfig
    from llm_safepref.presa_trainer import PresaTrainer

    torch.manual_seed(0)
    path = str(build_tiny_model()) if args.model == "tiny" else resolve_model_name(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    steps = args.warmup + args.steps
    pairs = _synthetic_pairs(args.batch * steps, seed=0, prompt_words=args.prompt_words, response_words=args.response_words)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    common = dict(
        output_dir=os.path.join(args.tmp, f"{args.model}-{args.method}"),
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        gradient_checkpointing=False,
        use_cpu=not cuda,
        max_length=args.max_length,
        seed=0,
        dataloader_num_workers=0,
    )
    if args.method == "kto":
        # The same 2B responses of each batch of pairs, labelled by their safety labels.
        rows = []
        for r in pairs:
            rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": r["chosen_is_safe"]})
            rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": r["rejected_is_safe"]})
        config = KTOConfig(loss_type="apo_zero_unpaired", per_device_train_batch_size=2 * args.batch, **common)
        trainer = KTOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    elif args.method == "dpo":
        config = DPOConfig(per_device_train_batch_size=args.batch, **common)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    else:
        config = PresaConfig(per_device_train_batch_size=args.batch, pref_loss="dpo",
                             safety_exclude_safe_rejected=bool(args.exclude_safe_rejected), **common)
        trainer = PresaTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                               processing_class=tokenizer, peft_config=lora)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_mem = _peak_memory_bytes()
    trainer.train()
    timed = times[args.warmup:]
    n_tokens = sum(len(tokenizer(r["prompt"] + r["chosen"]).input_ids) + len(tokenizer(r["prompt"] + r["rejected"]).input_ids)
                   for r in pairs[args.warmup * args.batch:])
    return {
        "model": args.model,
        "method": args.method,
        "step_time_s": statistics.median(timed),
        "step_times_s": timed,
        "peak_memory_bytes": _peak_memory_bytes(),
        "memory_before_train_bytes": base_mem,
        "tokens_per_s": n_tokens / sum(timed),
        "device": "cuda:" + torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def orchestrate(args) -> dict:
    results = {}
    for model in args.models:
        runs = {m: [] for m in METHODS}
        for rnd in range(args.rounds):
            order = list(METHODS)
            random.Random(rnd).shuffle(order)
            for method in order:
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", method,
                       "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--max_length", str(args.max_length), "--prompt_words", str(args.prompt_words),
                       "--response_words", str(args.response_words), "--tmp", args.tmp,
                       "--exclude_safe_rejected", str(args.exclude_safe_rejected)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                    raise SystemExit(f"worker failed: {' '.join(cmd)}")
                line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
                runs[method].append(json.loads(line))
                print(f"[{model}] round {rnd} {method}: {runs[method][-1]['step_time_s']:.3f} s/step", flush=True)
        med = {m: statistics.median(r["step_time_s"] for r in runs[m]) for m in METHODS}
        mem = {m: statistics.median(r["peak_memory_bytes"] for r in runs[m]) for m in METHODS}
        results[model] = {
            "model": model,
            "batch": {"pairs_per_step": args.batch, "max_length": args.max_length,
                      "prompt_words": args.prompt_words, "response_words": args.response_words,
                      "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
                      "presa_safety_exclude_safe_rejected": bool(args.exclude_safe_rejected)},
            "step_time_s": med,
            "peak_memory_bytes": mem,
            "tokens_per_s": {m: statistics.median(r["tokens_per_s"] for r in runs[m]) for m in METHODS},
            "step_time_ratio": med["presa"] / med["dpo"],
            "peak_memory_ratio": mem["presa"] / mem["dpo"],
            "two_trainer_ratio": med["presa"] / (med["dpo"] + med["kto"]),
            "device": runs["presa"][0]["device"],
            "runs": runs,
        }
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="'tiny', 'embedded', a Hub id or a path")
    p.add_argument("--batch", type=int, default=2, help="preference pairs per step (DPO/PRESA); KTO gets 2x responses")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions per method")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--prompt_words", type=int, default=24)
    p.add_argument("--response_words", type=int, default=48)
    p.add_argument("--exclude_safe_rejected", type=int, choices=[0, 1], default=1,
                   help="PRESA's safety_exclude_safe_rejected (1, as the default recipe runs it)")
    p.add_argument("--tmp", default="/tmp/llm_safepref_bench")
    p.add_argument("--out", default=None, help="write the JSON here (e.g. results/presa_vs_dpo.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    started = datetime.datetime.now(datetime.timezone.utc)
    per_model = orchestrate(args)
    report = {
        "command": "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS",) if v in os.environ)
        + "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": started.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (" (CPU only)" if "cpu" in per_model[args.models[0]]["device"] else ""),
        "note": "ratios from interleaved subprocess runs in one invocation; peak memory = process peak RSS on CPU",
        "results": per_model,
    }
    # Top-level fields for the headline model (the last one asked for, the embedded model by default).
    head = per_model[args.models[-1]]
    report.update({k: head[k] for k in ("step_time_ratio", "peak_memory_ratio", "two_trainer_ratio", "model", "batch")})
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for m, r in per_model.items():
        print(f"{m}: step_time_ratio={r['step_time_ratio']:.3f} peak_memory_ratio={r['peak_memory_ratio']:.3f} "
              f"two_trainer_ratio={r['two_trainer_ratio']:.3f}")


if __name__ == "__main__":
    main()
