"""PRESA vs TRL's DPO vs the two-trainer alternative (DPO pass + KTO pass): step time and memory.

    python benchmarks/presa_vs_dpo.py --models tiny embedded --out results/presa_vs_dpo.json

The reporting protocol (the defaults): at least 5 interleaved rounds, 2 torch threads per
run; the figure is the median of the per-round ratios, reported with their spread
(min / quartiles / max). A shorter run (``--rounds 2``) works and says it is outside the
protocol in its record.

Design decisions:

* Same model, same data, same batch, same LoRA adapter (reference = adapter disabled, as in
  the recipe) for every method; only the trainer differs. PRESA is
  ``llm_safepref.methods.presa.PresaTrainer`` as the default recipe configures it
  (``--exclude_safe_rejected 1``).
* Each (model, method, round) runs in its own subprocess, so peak memory is that method's
  alone (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU), with the thread
  count fixed (``--threads``: ``torch.set_num_threads`` and ``OMP_NUM_THREADS``). Methods are
  interleaved in a different order every round, so drifting machine load hits all of them.
* Step time of a run = median over its timed optimiser steps (after warm-up steps) of the wall
  time between ``on_step_begin`` and ``on_step_end``. A ratio is formed *within* a round
  (PRESA's run against the DPO and KTO runs of the same round, so they share the machine's
  state) and the reported ratio is the median of the per-round ratios, with min, quartiles
  and max of them as the spread. Ratios are reported, never absolute claims: these machines
  are noisy.
* The two-trainer alternative is what PRESA replaces: a DPO step on the pairs plus a KTO
  step (``apo_zero_unpaired``, the cheapest KTO variant: no KL forward) on the same 2B
  responses with their safety labels. Its cost per global batch is the sum of the two.
* The results file is :func:`llm_safepref.core.provenance.run_record` (command, git revision,
  versions, lock hash, machine, date) plus the figures, written atomically by
  :func:`~llm_safepref.core.provenance.write_json`; the table is
  :func:`llm_safepref.core.tables.markdown_table` (printed, and written next to the JSON as
  ``.md``).
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from llm_safepref._runtime import offline_defaults  # noqa: E402
from llm_safepref.core.cli import ToolParser  # noqa: E402  (torch-and-numpy core only)
from llm_safepref.core.provenance import run_record, write_json  # noqa: E402
from llm_safepref.core.tables import markdown_table, text_table  # noqa: E402

METHODS = ("dpo", "presa", "kto")
#: The reporting protocol: at least this many rounds, at this many threads.
PROTOCOL_ROUNDS = 5
PROTOCOL_THREADS = 2
RATIOS = ("step_time_ratio", "peak_memory_ratio", "two_trainer_ratio")


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


def load_bench_model(args):
    """``(model, tokenizer, cuda)`` of ``args.model`` ('tiny', 'embedded', an id or a path): bf16 on a GPU, fp32
    on a CPU, a pad token set, torch seeded 0 and set to ``args.threads`` threads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_safepref.models import build_tiny_model, resolve_model_name

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = str(build_tiny_model()) if args.model == "tiny" else resolve_model_name(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    return model, tokenizer, cuda


def train_timed(trainer, warmup: int) -> list[float]:
    """Train, timing every optimiser step (``on_step_begin`` -> ``on_step_end``, CUDA synchronised); the steps
    after the first ``warmup`` ones, in seconds. Resets the CUDA peak-memory counter first."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
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
    trainer.train()
    return times[warmup:]


def worker(args) -> dict:
    """One (model, method) run in this process; returns its figures (printed as a JSON line)."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from llm_safepref.methods.presa import PresaConfig, PresaTrainer

    model, tokenizer, cuda = load_bench_model(args)
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

    base_mem = _peak_memory_bytes()
    timed = train_timed(trainer, args.warmup)
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
        "device": ("cuda:" + torch.cuda.get_device_name(0)) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def spread(values: list[float]) -> dict[str, float]:
    """``{"median", "min", "q1", "q3", "max", "n"}`` of per-round values (quartiles: inclusive method)."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "min": values[0], "q1": q1, "q3": q3, "max": values[-1],
            "n": len(values)}


def round_ratios(run: dict[str, dict]) -> dict[str, float]:
    """PRESA against DPO and against DPO + KTO, within one round (``run[method]`` = the worker's figures)."""
    return {
        "step_time_ratio": run["presa"]["step_time_s"] / run["dpo"]["step_time_s"],
        "peak_memory_ratio": run["presa"]["peak_memory_bytes"] / run["dpo"]["peak_memory_bytes"],
        "two_trainer_ratio": run["presa"]["step_time_s"] / (run["dpo"]["step_time_s"] + run["kto"]["step_time_s"]),
    }


def _worker_command(args, model: str, method: str) -> list[str]:
    return [sys.executable, __file__, "--worker", "--model", model, "--method", method,
            "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--max_length", str(args.max_length), "--prompt_words", str(args.prompt_words),
            "--response_words", str(args.response_words), "--tmp", args.tmp,
            "--exclude_safe_rejected", str(args.exclude_safe_rejected), "--threads", str(args.threads)]


def interleaved_rounds(methods, rounds: int, command_of, env: dict, ratios_of, *, label: str = ""):
    """``rounds`` rounds, each running every method's worker subprocess once in a seeded shuffled order.

    ``command_of(method)``: the worker's argv (it prints its figures as a JSON line); ``ratios_of(round)``: the
    round's ratios from ``{method: figures}``. Returns ``({method: [figures per round]}, [ratios per round])``.
    """
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    per_round: list[dict[str, float]] = []
    for rnd in range(rounds):
        order = list(methods)
        random.Random(rnd).shuffle(order)
        this_round = {}
        for method in order:
            cmd = command_of(method)
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                raise SystemExit(f"worker failed: {' '.join(cmd)}")
            line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
            this_round[method] = {**json.loads(line), "round": rnd, "order": order.index(method)}
            runs[method].append(this_round[method])
            print(f"[{label}] round {rnd} {method}: {this_round[method]['step_time_s']:.3f} s/step", flush=True)
        per_round.append(ratios_of(this_round))
    return runs, per_round


def orchestrate(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for model in args.models:
        runs, per_round = interleaved_rounds(METHODS, args.rounds, lambda m: _worker_command(args, model, m), env,
                                             round_ratios, label=model)
        spreads = {name: spread([r[name] for r in per_round]) for name in RATIOS}
        results[model] = {
            "model": model,
            "batch": {"pairs_per_step": args.batch, "max_length": args.max_length,
                      "prompt_words": args.prompt_words, "response_words": args.response_words,
                      "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
                      "threads": args.threads,
                      "presa_safety_exclude_safe_rejected": bool(args.exclude_safe_rejected)},
            # Headline figures: the median of the per-round ratios.
            **{name: spreads[name]["median"] for name in RATIOS},
            "ratio_spread": spreads,
            "per_round_ratios": per_round,
            "step_time_s": {m: statistics.median(r["step_time_s"] for r in runs[m]) for m in METHODS},
            "peak_memory_bytes": {m: statistics.median(r["peak_memory_bytes"] for r in runs[m]) for m in METHODS},
            "tokens_per_s": {m: statistics.median(r["tokens_per_s"] for r in runs[m]) for m in METHODS},
            "device": runs["presa"][0]["device"],
            "runs": runs,
        }
    return results


def table(per_model: dict, *, markdown: bool) -> str:
    headers = ["model", "ratio", "median", "min", "q1", "q3", "max", "rounds"]
    labels = {"step_time_ratio": "step time PRESA / DPO", "peak_memory_ratio": "peak memory PRESA / DPO",
              "two_trainer_ratio": "step time PRESA / (DPO + KTO)"}
    rows = []
    for model, r in per_model.items():
        for name in RATIOS:
            s = r["ratio_spread"][name]
            rows.append([model, labels[name], s["median"], s["min"], s["q1"], s["q3"], s["max"], s["n"]])
    return markdown_table(headers, rows) if markdown else text_table(headers, rows)


def build_parser() -> ToolParser:
    p = ToolParser(prog="benchmarks/presa_vs_dpo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "embedded"], help="'tiny', 'embedded', a Hub id or a path")
    p.add_argument("--batch", type=int, default=2, help="preference pairs per step (DPO/PRESA); KTO gets 2x responses")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=PROTOCOL_ROUNDS,
                   help=f"interleaved repetitions per method (the protocol: at least {PROTOCOL_ROUNDS})")
    p.add_argument("--threads", type=int, default=PROTOCOL_THREADS,
                   help=f"torch / OpenMP threads of every run (the protocol: {PROTOCOL_THREADS})")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--prompt_words", type=int, default=24)
    p.add_argument("--response_words", type=int, default=48)
    p.add_argument("--exclude_safe_rejected", type=int, choices=[0, 1], default=1,
                   help="PRESA's safety_exclude_safe_rejected (1, as the default recipe runs it)")
    p.add_argument("--tmp", default="/tmp/llm_safepref_bench", help="scratch folder of the runs' output_dir")
    p.add_argument("--out", default=None,
                   help="write the JSON record here (e.g. results/presa_vs_dpo.json), and the table next to it (.md)")
    p.add_argument("--worker", action="store_true", help="(internal) run one (model, method) in this process")
    p.add_argument("--model", help="(internal) the worker's model")
    p.add_argument("--method", choices=METHODS, help="(internal) the worker's method")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("rounds", "steps", "threads", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    offline_defaults()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    meets = args.rounds >= PROTOCOL_ROUNDS and args.threads == PROTOCOL_THREADS
    if not meets:
        print(f"note: {args.rounds} rounds at {args.threads} threads is outside the reporting protocol "
              f"(>= {PROTOCOL_ROUNDS} rounds at {PROTOCOL_THREADS} threads)", file=sys.stderr)
    per_model = orchestrate(args)
    head = per_model[args.models[-1]]  # the headline model: the last one asked for (embedded by default)
    record = run_record(
        protocol={"rounds": args.rounds, "threads": args.threads, "meets_reporting_protocol": meets,
                  "ratio": "median over rounds of the per-round ratio (PRESA's run against the DPO and KTO runs "
                           "of the same round); spread = min, quartiles, max of the per-round ratios"},
        note="interleaved subprocess runs in one invocation; peak memory = process peak RSS on CPU",
        model=head["model"], batch=head["batch"], **{name: head[name] for name in RATIOS},
        ratio_spread=head["ratio_spread"], results=per_model,
    )
    print(table(per_model, markdown=False))
    if args.out:
        out = Path(args.out)
        write_json(out, record)
        out.with_suffix(".md").write_text(
            f"PRESA vs DPO vs DPO + KTO ({record['date']}; `{record['command']}`; {record['machine']}; "
            f"{args.rounds} rounds at {args.threads} threads)\n\n" + table(per_model, markdown=True) + "\n"
        )
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
